"""condify methods, one folder each; each registers itself in :mod:`condify.registry`.

The package is also callable: ``condify.methods()`` lists registered method names with a one-line
description each (a package named like the function it must expose, so the module is made callable).
"""

from __future__ import annotations

import sys
import types


class _MethodsModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        """Registered method names with a one-line description each."""
        from ..registry import all_methods

        return {m.name: m.description for m in all_methods()}


sys.modules[__name__].__class__ = _MethodsModule
