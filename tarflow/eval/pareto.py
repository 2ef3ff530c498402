"""The speed/quality front of a sampler search: which settings no other setting beats on both
seconds per image and FID, and a chart of all of them (pure maths plus a matplotlib figure;
:mod:`tarflow.app.search_report` reads a sweep's files and calls these)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from PIL import Image

from tarflow.eval.plots import DPI, SIZE, _to_image


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` in every coordinate (lower is better) and better in
    one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (every coordinate minimised; non-finite
    points never belong), ordered by their first coordinate."""
    finite = [i for i, p in enumerate(points) if all(math.isfinite(float(x)) for x in p)]
    front = [i for i in finite if not any(dominates(points[j], points[i]) for j in finite)]
    return sorted(front, key=lambda i: tuple(points[i]))


def pareto_figure(points: Sequence[tuple[float, float]], front: Sequence[int], *,
                  labels: Sequence[str] | None = None,
                  marks: Mapping[str, tuple[float, float]] | None = None,
                  xlabel: str = "seconds per image", ylabel: str = "FID", title: str = "",
                  ) -> Figure:
    """Every point grey, the front as a blue staircase with its labels, each of ``marks`` (a
    reference such as the planner's ``auto``) as a red star named in the legend."""
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color="0.6",
                   label=f"trials ({len(points)})")
    if front:
        xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(xs, ys, where="post", color="tab:blue", linewidth=1.2)
        ax.scatter(xs, ys, s=30, color="tab:blue", label=f"Pareto front ({len(front)})",
                   zorder=3)
        for i in front:
            if labels is not None:
                ax.annotate(str(labels[i]), points[i], textcoords="offset points",
                            xytext=(4, 4), fontsize="x-small")
    for name, (x, y) in (marks or {}).items():
        ax.scatter([x], [y], marker="*", s=140, color="tab:red", label=name, zorder=4)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return fig


def pareto_chart(points: Sequence[tuple[float, float]], front: Sequence[int],
                 **kwargs) -> Image.Image:
    """:func:`pareto_figure` rendered as an RGB image."""
    return _to_image(pareto_figure(points, front, **kwargs))
