"""Helpers for the picture tests: a written image is checked for its size and for not being blank."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from longserve.viz.figures import grid_pixels

# A blank (one-colour) figure has zero pixel variance; a drawn heatmap is far above this.
MIN_PIXEL_VARIANCE = 1e-3


def _check_png(path: str, rows: int, cols: int) -> None:
    from matplotlib.image import imread

    pixels = imread(path)  # [height, width, channels] floats in [0, 1]
    assert pixels.shape[:2] == grid_pixels(rows, cols)
    assert pixels[..., :3].var() > MIN_PIXEL_VARIANCE


@pytest.fixture
def check_png() -> Callable[[str, int, int], None]:
    """``check_png(path, rows, cols)``: a PNG of a ``rows x cols`` panel grid with something drawn on it."""
    return _check_png
