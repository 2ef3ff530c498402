"""Small PIL drawings for loggers without native charts: a sample grid, a bar chart, line plots.

matplotlib is not a dependency, and these pictures only need to be readable, so they are drawn
with PIL's default bitmap font: axes, a few tick labels, one colour per series and a legend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from tarflow.eval import images_to_uint8

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 130, 45, 50  # margins; the right one holds the legend


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


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _frame(title: str, xlabel: str, ylabel: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    draw.text((LEFT, 5), title, fill="black")
    draw.line([(LEFT, TOP), (LEFT, HEIGHT - BOTTOM), (WIDTH - RIGHT, HEIGHT - BOTTOM)],
              fill="black")
    draw.text(((LEFT + WIDTH - RIGHT) // 2 - 3 * len(xlabel), HEIGHT - 20), xlabel, fill="black")
    draw.text((5, TOP - 24), ylabel, fill="black")
    return img, draw


def _y_axis(draw: ImageDraw.ImageDraw, lo: float, hi: float) -> None:
    """Five labelled ticks from lo to hi on the left axis."""
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * k / 4
        draw.line([(LEFT - 4, y), (LEFT, y)], fill="black")
        draw.text((5, y - 6), _fmt(v), fill="black")


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str = "",
              xlabel: str = "", ylabel: str = "") -> Image.Image:
    """Vertical bars from zero, one per label, the value printed above each bar."""
    img, draw = _frame(title, xlabel, ylabel)
    finite = [v for v in values if math.isfinite(v)]
    hi = max([*finite, 0.0]) or 1.0
    _y_axis(draw, 0.0, hi)
    span = (WIDTH - RIGHT - LEFT) / max(len(values), 1)
    for k, (label, v) in enumerate(zip(labels, values, strict=True)):
        x0 = LEFT + k * span + 0.15 * span
        x1 = LEFT + (k + 1) * span - 0.15 * span
        height = (HEIGHT - TOP - BOTTOM) * (min(v, hi) / hi if math.isfinite(v) else 1.0)
        top = HEIGHT - BOTTOM - max(height, 0.0)
        draw.rectangle([x0, top, x1, HEIGHT - BOTTOM], fill=PALETTE[k % len(PALETTE)])
        draw.text((x0, top - 14), _fmt(v), fill="black")
        draw.text(((x0 + x1) / 2 - 3 * len(str(label)), HEIGHT - BOTTOM + 5), str(label),
                  fill="black")
    return img


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               title: str = "", xlabel: str = "", ylabel: str = "") -> Image.Image:
    """One polyline per named series of (xs, ys); non-finite points are skipped."""
    img, draw = _frame(title, xlabel, ylabel)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
           if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        draw.text((LEFT + 10, TOP + 10), "no data", fill="black")
        return img
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1  # a single point still needs a non-empty range
    y_hi = y_hi if y_hi > y_lo else y_lo + 1
    _y_axis(draw, y_lo, y_hi)
    for k in range(5):
        v = x_lo + (x_hi - x_lo) * k / 4
        x = LEFT + (WIDTH - RIGHT - LEFT) * k / 4
        draw.text((x - 6, HEIGHT - BOTTOM + 5), _fmt(v), fill="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (LEFT + (WIDTH - RIGHT - LEFT) * (x - x_lo) / (x_hi - x_lo),
                HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (y - y_lo) / (y_hi - y_lo))

    for k, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        line = [to_px(x, y) for x, y in zip(xs, ys, strict=True)
                if math.isfinite(x) and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        ly = TOP + 15 * k
        draw.line([(WIDTH - RIGHT + 10, ly + 6), (WIDTH - RIGHT + 30, ly + 6)], fill=colour,
                  width=3)
        draw.text((WIDTH - RIGHT + 35, ly), str(name), fill="black")
    return img
