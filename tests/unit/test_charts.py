"""The matplotlib charts written for loggers without native charts (CSV): readable axes."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from tarflow.eval.plots import DPI, SIZE, bar_figure, convergence_figure
from tarflow.lit.callbacks.media import RoundMedia, write_media_files


def _ticks_in_view(axis, lo: float, hi: float) -> list[float]:
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def test_convergence_axes_are_whole_iterations_and_decades() -> None:
    # The hand-drawn chart put x ticks at fractional iterations (14.8, 28.5, 42.2) and linear
    # y ticks such as 1.04e-07; few iterations and a narrow residual range are where a default
    # locator would choose fractional ticks (1.25, 1.5, ...).
    series = {"block 0": ([1, 2, 3], [-0.4, -1.1, -2.3]), "block 1": ([1, 2], [-0.6, -1.9])}
    fig = convergence_figure(series, tol=1e-2, title="t")
    ax = fig.axes[0]
    fig.canvas.draw()  # tick locations are decided at draw time
    x_lo, x_hi = ax.get_xlim()
    y_lo, y_hi = ax.get_ylim()
    xt, yt = _ticks_in_view(ax.xaxis, x_lo, x_hi), _ticks_in_view(ax.yaxis, y_lo, y_hi)
    assert len(xt) >= 3 and all(float(t).is_integer() for t in xt), xt
    assert len(yt) >= 2 and all(float(t).is_integer() for t in yt), yt
    assert y_lo <= -2.3 and y_hi >= -0.4
    assert ax.get_ylabel() == "log10 relative residual" and ax.get_xlabel() == "Jacobi iteration"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["block 0", "block 1", "tol = 0.01"]
    tol_line = ax.get_lines()[-1]
    assert np.allclose(tol_line.get_ydata(), math.log10(1e-2))


def test_bar_chart_writes_every_value_and_counts_on_whole_ticks() -> None:
    fig = bar_figure(["0", "1", "2"], [4.0, 19.0, float("nan")], fmt="{:.3g}", integer=True)
    ax = fig.axes[0]
    fig.canvas.draw()
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["4", "19", "n/a"]
    yt = _ticks_in_view(ax.yaxis, *ax.get_ylim())
    assert all(float(t).is_integer() for t in yt)


def test_media_files_are_pictures_of_the_charts(tmp_path) -> None:
    media = RoundMedia(step=7, epoch=1, crm_shares={"0": 20.0, "1": 80.0},
                       iters={"0": 3.0, "1": 15.0},
                       convergence={"block 1": ([1, 2, 3], [-0.5, -2.0, -4.0])}, tol=1e-3)
    paths = write_media_files(tmp_path, media)
    names = sorted(p.name for p in paths)
    assert names == ["blocks_crm_chart_epoch001_step0000007.png",
                     "sampling_convergence_epoch001_step0000007.png",
                     "sampling_iters_chart_epoch001_step0000007.png"]
    for path in paths:
        picture = np.asarray(Image.open(path).convert("RGB"))
        assert picture.shape == (round(SIZE[1] * DPI), round(SIZE[0] * DPI), 3)
        # Drawn, not blank: white background plus dark text/axes and coloured marks.
        assert (picture < 100).any() and (picture == 255).mean() > 0.5
