"""Segmentation's saturation floor and threshold edge (pipeline/tissue.py), on whole slides.

Found by planting bugs: a floor that is ignored, or `>=` for `>` at the threshold, let
a blank slide become one big tissue polygon. Slides are 2048² px at 0.5 µm/px, so the
background is far larger than the largest hole that segmentation fills.
"""

from __future__ import annotations

import numpy as np
import tifffile

from pipeline.slide import open_slide
from pipeline.tissue import TissueSettings, hsv_saturation, segment_tissue

SIDE = 2048


def _flat_slide(path, rgb: tuple[int, int, int], noise: int = 0):
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[...] = rgb
    if noise:
        yy, xx = np.mgrid[0:SIDE, 0:SIDE]
        jitter = ((xx * 7 + yy * 13) % (2 * noise + 1)) - noise
        image = np.clip(image.astype(int) - np.abs(jitter)[..., None] * (np.arange(3) == 2), 0, 255).astype(np.uint8)
    px_per_cm = 1e4 / 0.5
    with tifffile.TiffWriter(path) as tiff:
        for factor in (1, 4, 16):
            tiff.write(image[::factor, ::factor], tile=(256, 256), photometric="rgb", subfiletype=0 if factor == 1 else 1,
                       resolution=(px_per_cm / factor, px_per_cm / factor), resolutionunit="CENTIMETER", metadata=None)
    return image


def _tissue_area(path) -> float:
    slide = open_slide(str(path))
    try:
        return segment_tissue(slide, 0.5, TissueSettings()).area
    finally:
        slide.close()


def test_a_blank_slide_with_a_faint_yellow_tint_has_no_tissue(tmp_path):
    image = _flat_slide(tmp_path / "tint.tif", (250, 247, 240), noise=3)  # saturation ~10–13, below the floor 15
    saturation = hsv_saturation(image[::16, ::16])
    assert 0 < saturation.min() < saturation.max() < TissueSettings().saturation_floor  # Otsu alone would split it
    assert _tissue_area(tmp_path / "tint.tif") == 0


def test_a_flat_slide_exactly_at_the_threshold_is_background(tmp_path):
    floor = TissueSettings().saturation_floor
    at = _flat_slide(tmp_path / "at.tif", (255, 255, 240))
    assert int(hsv_saturation(at[:1, :1])[0, 0]) == floor
    assert _tissue_area(tmp_path / "at.tif") == 0
    above = _flat_slide(tmp_path / "above.tif", (255, 255, 239))  # one step above the floor: all tissue
    assert int(hsv_saturation(above[:1, :1])[0, 0]) == floor + 1
    assert _tissue_area(tmp_path / "above.tif") > 0.9 * SIDE * SIDE
