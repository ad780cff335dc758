"""``condify.track``: what fraction of each converted site's compute really ran, for every method.

Each converted module's state (:class:`condify.patching.SiteState`) counts executed and total units of
its own compute while a tracker is open: expert-token pairs for dynamic-k, kept tokens for
mod-threshold. Counting costs a host sync per site and call, so it is off unless tracked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .patching import patched


@dataclass
class Count:
    """Executed and total compute units of one site."""

    method: str
    kind: str
    layer: int
    executed: float = 0.0
    total: float = 0.0

    @property
    def fraction(self) -> float:
        return self.executed / self.total if self.total else float("nan")


@dataclass
class Tracking:
    """Counts per converted module path, filled while :func:`track` is open."""

    sites: dict[str, Count] = field(default_factory=dict)

    def _select(self, method: str | None, kind: str | None, paths: list[str] | None) -> list[Count]:
        keep = None if paths is None else set(paths)
        return [
            c
            for p, c in self.sites.items()
            if (method is None or c.method == method)
            and (kind is None or c.kind == kind)
            and (keep is None or p in keep)
        ]

    def fraction(
        self, method: str | None = None, kind: str | None = None, paths: list[str] | None = None
    ) -> float:
        """Executed / total over the selected sites (NaN when nothing was counted)."""
        cs = self._select(method, kind, paths)
        total = sum(c.total for c in cs)
        return sum(c.executed for c in cs) / total if total else float("nan")

    def per_layer(self, method: str | None = None, kind: str | None = None) -> dict[int, float]:
        """Executed fraction per decoder layer index over the selected sites."""
        out: dict[int, list[float]] = {}
        for c in self._select(method, kind, None):
            e, t = out.setdefault(c.layer, [0.0, 0.0])
            out[c.layer] = [e + c.executed, t + c.total]
        return {i: e / t if t else float("nan") for i, (e, t) in sorted(out.items())}


@contextlib.contextmanager
def track(model: nn.Module) -> Iterator[Tracking]:
    """Count executed compute of every converted site while open::

    with condify.track(model) as t:
        model(ids)
    t.fraction("dynamic-k", "mlp"), t.per_layer("mod-threshold")
    """
    tracking = Tracking()
    sites = [(p, m._condify_patch) for p, m in patched(model) if m._condify_patch.state.kind != "none"]
    for path, pt in sites:
        pt.state.counter = tracking.sites[path] = Count(pt.method, pt.state.kind, pt.state.layer)
    try:
        yield tracking
    finally:
        for _, pt in sites:
            pt.state.counter = None
