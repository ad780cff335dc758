"""Global module hooks (``torch.nn.modules.module.register_module_forward_hook`` and friends).

A registered global hook runs on every module call, so the fast paths that read a projection's weights
instead of calling it step aside while one is registered (:func:`global_hooks`). Hooks that only watch,
such as the module tracker of ``FlopCounterMode``, can be declared with :func:`observing`: then the model
runs the path it runs without them, which is what they are there to measure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.nn.modules import module as _nn_module

_GLOBAL_HOOKS = (
    _nn_module._global_forward_hooks,
    _nn_module._global_forward_pre_hooks,
    _nn_module._global_backward_hooks,
    _nn_module._global_backward_pre_hooks,
)
_observers: set[tuple[int, Any]] = set()


def _keys() -> set[tuple[int, Any]]:
    return {(i, k) for i, d in enumerate(_GLOBAL_HOOKS) for k in d}


def global_hooks() -> bool:
    """True if a global module forward/backward (pre-)hook other than a declared observer is registered."""
    if not any(_GLOBAL_HOOKS):  # the common case, on every decode step: no dict walk
        return False
    return not _keys() <= _observers


@contextlib.contextmanager
def observing(ctx: contextlib.AbstractContextManager[Any]) -> Iterator[Any]:
    """Enter ``ctx``; the global hooks it registers on entry are observers while it is entered."""
    before = _keys()
    with ctx as value:
        added = _keys() - before
        _observers.update(added)
        try:
            yield value
        finally:
            _observers.difference_update(added)
