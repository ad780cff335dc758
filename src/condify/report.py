"""A tiny markdown + PNG report: title, environment, text, tables, plots.

```python
rep = Report("dynamic-k on SmolLM2")
rep.add_table(["method", "ppl ratio"], [["dense", 1.0], ["dynamic-k", 1.08]])
rep.plot_bars("speed", ["dense", "dynamic-k"], [1.0, 1.3], ylabel="decode speedup")
rep.write("out/")   # out/report.md, out/speed.png
```
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Report", "format_value"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def format_value(value: Any) -> str:
    """Format a table cell: floats to 4 significant digits, everything else with ``str``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


class Report:
    """Accumulates markdown blocks and plots; :meth:`write` renders them into a directory.

    The environment section (versions, device, threads, date) is taken from
    :func:`condify.evaluate.environment` when the report is created, unless ``env`` is given.
    """

    def __init__(self, title: str, env: Mapping[str, str] | None = None) -> None:
        if env is None:
            from .evaluate import environment

            env = environment()
        self.title = title
        self.env = dict(env)
        self._blocks: list[str] = []
        self._plots: dict[str, Callable[[Any], Any]] = {}

    # ------------------------------------------------------------------ content

    def add_heading(self, text: str, level: int = 2) -> None:
        """Add a section heading (``level`` 2..6)."""
        if not 2 <= level <= 6:
            raise ValueError(f"heading level must be in 2..6, got {level}")
        self._blocks.append(f"{'#' * level} {text}")

    def add_text(self, text: str) -> None:
        """Add a markdown paragraph."""
        self._blocks.append(text.strip())

    def add_table(
        self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None
    ) -> None:
        """Add a markdown table; every row must have ``len(headers)`` cells."""
        if not headers:
            raise ValueError("a table needs at least one column")
        for i, row in enumerate(rows):
            if len(row) != len(headers):
                raise ValueError(f"table row {i} has {len(row)} cells, expected {len(headers)}")
        lines = [
            "| " + " | ".join(format_value(h) for h in headers) + " |",
            "|" + "|".join("---" for _ in headers) + "|",
        ]
        lines += ["| " + " | ".join(format_value(c) for c in row) + " |" for row in rows]
        if caption:
            lines = [f"*{caption}*", "", *lines]
        self._blocks.append("\n".join(lines))

    def add_plot(self, name: str, fn: Callable[[Any], Any], caption: str | None = None) -> None:
        """Add a plot drawn by ``fn(ax)`` on a fresh matplotlib Axes, saved as ``<name>.png``."""
        if not _NAME.match(name):
            raise ValueError(f"plot name {name!r} must be letters, digits, '_', '-' or '.'")
        if name in self._plots:
            raise ValueError(f"a plot named {name!r} already exists")
        self._plots[name] = fn
        self._blocks.append(f"![{caption or name}]({name}.png)")

    def plot_bars(
        self,
        name: str,
        labels: Sequence[str],
        values: Sequence[float],
        *,
        ylabel: str = "",
        title: str | None = None,
        reference: float | None = None,
    ) -> None:
        """Bar chart of ``values`` per label; ``reference`` draws a dashed horizontal line (e.g. 1.0)."""
        if len(labels) != len(values):
            raise ValueError(f"{len(labels)} labels for {len(values)} values")
        labels, values = list(labels), [float(v) for v in values]

        def draw(ax: Any) -> None:
            ax.bar(range(len(values)), values, color="tab:blue")
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right")
            if reference is not None:
                ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
            ax.set_ylabel(ylabel)
            ax.set_title(title or name)

        self.add_plot(name, draw, caption=title)

    def plot_lines(
        self,
        name: str,
        x: Sequence[float],
        series: Mapping[str, Sequence[float]],
        *,
        xlabel: str = "",
        ylabel: str = "",
        title: str | None = None,
        logy: bool = False,
    ) -> None:
        """One line with markers per entry of ``series``, all over the same ``x``."""
        x = [float(v) for v in x]
        data = {k: [float(v) for v in vs] for k, vs in series.items()}
        for key, ys in data.items():
            if len(ys) != len(x):
                raise ValueError(f"series {key!r} has {len(ys)} points, x has {len(x)}")

        def draw(ax: Any) -> None:
            for key, ys in data.items():
                ax.plot(x, ys, marker="o", label=key)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title or name)
            if len(data) > 1:
                ax.legend()
            ax.grid(alpha=0.3)

        self.add_plot(name, draw, caption=title)

    # ------------------------------------------------------------------ output

    def to_markdown(self) -> str:
        """The whole report as markdown (plots referenced as ``<name>.png``)."""
        env = "\n".join(f"| {format_value(k)} | {format_value(v)} |" for k, v in self.env.items())
        parts = [f"# {self.title}", "## Environment", "| | |\n|---|---|\n" + env, *self._blocks]
        return "\n\n".join(parts) + "\n"

    def write(self, directory: str | Path, filename: str = "report.md") -> Path:
        """Write ``filename`` and one PNG per plot into ``directory``; return the markdown path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self._plots:
            # Agg canvas on a bare Figure: no pyplot, no global backend switch, no display needed.
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            for name, fn in self._plots.items():
                fig = Figure(figsize=(6, 4), dpi=100)
                FigureCanvasAgg(fig)
                ax = fig.add_subplot()
                fn(ax)
                fig.tight_layout()
                fig.savefig(out / f"{name}.png")
        path = out / filename
        path.write_text(self.to_markdown(), encoding="utf-8")
        return path
