"""condify methods: one folder each; each registers itself in `condify.registry`."""
