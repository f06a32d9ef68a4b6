"""Figure plumbing every picture shares: a grid of fixed-size panels, token tick labels, writing PNG or SVG.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot, no global state); PNGs are rendered by Agg. A
figure is ``cols x rows`` panels of ``PANEL_INCHES`` at ``DPI``, so its pixel size follows from its layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from longserve.viz.checks import VizError

DPI = 100
PANEL_INCHES = 4.0  # each panel's width and height
MAX_TOKEN_LABELS = 48  # more tokens than this: ticks show positions instead of token text
FORMATS = {".png": "png", ".svg": "svg"}


def grid_figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows x cols`` panels and its axes, an object array [rows, cols]."""
    figure = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def grid_pixels(rows: int, cols: int) -> tuple[int, int]:
    """(height, width) in pixels of a ``grid_figure(rows, cols)`` once saved as PNG."""
    return round(rows * PANEL_INCHES * DPI), round(cols * PANEL_INCHES * DPI)


def label_tokens(axes: Axes, labels: Sequence[str], axis: str) -> None:
    """Put token text on ``axis`` ("x" or "y") of a heatmap with one row/column per token, if few enough."""
    if len(labels) > MAX_TOKEN_LABELS:
        return
    ticks = np.arange(len(labels))
    size = 8 if len(labels) <= 24 else 6
    if axis == "x":
        axes.set_xticks(ticks, labels, rotation=90, fontsize=size)
    else:
        axes.set_yticks(ticks, labels, fontsize=size)


def output_format(path: str) -> str:
    """The image format for ``path`` from its suffix; ``VizError`` for anything but .png and .svg."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise VizError(f"output {path!r}: the file name must end in .png or .svg")
    return FORMATS[suffix]


def save_figure(figure: Figure, path: str) -> str:
    """Write ``figure`` to ``path`` (PNG via Agg, or SVG), creating its directory; returns the path."""
    fmt = output_format(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format=fmt, dpi=DPI)
    return path
