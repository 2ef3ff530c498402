"""Pictures for loggers without native charts (CSV, TensorBoard): a sample grid and two charts.

The grid is torchvision's ``make_grid``; the charts are matplotlib figures drawn off-screen with
the Agg canvas (no display, no pyplot global state, safe in a training process). W&B gets native,
interactive charts instead (:mod:`tarflow.lit.callbacks.media`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torchvision.utils import make_grid

from tarflow.eval import images_to_uint8

SIZE = (6.4, 4.0)  # inches; at DPI 100 a 640x400 picture, readable in a file browser
DPI = 100


def image_grid(images: torch.Tensor, nrow: int | None = None, *, min_cell: int = 64) -> Image.Image:
    """A grid of samples as an RGB image.

    Args:
        images: (B, C, H, W) floats nominally in [-1, 1] (clipped), C in {1, 3}.
        nrow: images per row; None makes the grid about square.
        min_cell: small images are enlarged (nearest neighbour, integer factor) to about this
            many pixels so a 16x16 digit is visible in a dashboard.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot draw a grid of zero images")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    pixels = images_to_uint8(images.detach().float().cpu())  # (B, 3, H, W) uint8
    grid = make_grid(pixels, nrow=nrow, padding=2, pad_value=255)  # (3, H', W')
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, min_cell // max(images.shape[-1], 1))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def _to_image(fig: Figure) -> Image.Image:
    """Render a figure with the Agg canvas into an RGB PIL image."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")


def bar_figure(labels: Sequence[str], values: Sequence[float], *, title: str = "",
               xlabel: str = "", ylabel: str = "", fmt: str = "{:.1f}",
               integer: bool = False) -> Figure:
    """Vertical bars from zero, one per label, each value written above its bar.

    Non-finite values are drawn as missing bars (their label says ``n/a``); ``integer`` puts
    the value axis's ticks on whole numbers (counts).
    """
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    heights = [v if math.isfinite(v) else 0.0 for v in values]
    # Numeric positions with text ticks: string x values that look like numbers make
    # matplotlib log a "categorical units" notice on every chart.
    positions = list(range(len(heights)))
    bars = ax.bar(positions, heights, color="tab:blue")
    ax.set_xticks(positions, [str(k) for k in labels])
    ax.bar_label(bars, labels=[fmt.format(v) if math.isfinite(v) else "n/a" for v in values],
                 padding=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def convergence_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                       tol: float | None = None, title: str = "") -> Figure:
    """One line per block: log10 relative residual against the Jacobi iteration.

    Args:
        series: per label, (iterations, log10 residuals).
        tol: the stopping tolerance, drawn as a dashed line at log10(tol) when > 0.
        title: figure title.
    """
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        # A block of one iteration is a single point: the marker keeps it visible.
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=str(name))
    if tol is not None and tol > 0:
        ax.axhline(math.log10(tol), color="grey", linestyle="--", linewidth=1,
                   label=f"tol = {tol:g}")
    if not series:
        ax.text(0.5, 0.5, "no Jacobi iterations traced", ha="center", va="center",
                transform=ax.transAxes)
    # Iterations are counts and log10 residuals read best at whole decades.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="Jacobi iteration", ylabel="log10 relative residual")
    ax.grid(alpha=0.3)
    if series or tol:
        ax.legend(loc="upper right", fontsize="small")
    return fig


def bar_chart(labels: Sequence[str], values: Sequence[float], **kwargs) -> Image.Image:
    """:func:`bar_figure` rendered as an RGB image."""
    return _to_image(bar_figure(labels, values, **kwargs))


def convergence_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      **kwargs) -> Image.Image:
    """:func:`convergence_figure` rendered as an RGB image."""
    return _to_image(convergence_figure(series, **kwargs))
