"""condify methods, one folder each; each registers itself in :mod:`condify.registry`
(list them with :func:`condify.list_methods`)."""
