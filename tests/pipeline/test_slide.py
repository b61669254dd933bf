"""Slide opening errors, RGBA→RGB on white, MPP resolution order and fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import write_synthetic_slide

from pipeline.readers import OpenSlideReader, SlideMetadata
from pipeline.slide import (
    NoMppError,
    NotASlideError,
    SlideNotFoundError,
    UnreadableSlideError,
    fingerprint,
    open_slide,
    read_rgb,
    resolve_mpp,
    rgba_to_rgb_white,
)


@pytest.fixture()
def slide_file(tmp_path):
    path = tmp_path / "s.tif"
    image = write_synthetic_slide(path, width=512, height=384, mpp=0.5, tissue_rects=[(0, 0, 256, 384)])
    return path, image


def test_synthetic_slide_opens_with_its_mpp_and_pixels(slide_file):
    path, image = slide_file
    slide = open_slide(path)
    assert slide.level_dimensions == ((512, 384), (256, 192), (128, 96))
    assert resolve_mpp(slide, None) == (0.5, "slide")
    np.testing.assert_array_equal(read_rgb(slide, (0, 0), 0, (512, 384)), image)


def test_open_errors(tmp_path, slide_file):
    with pytest.raises(SlideNotFoundError, match="slide file not found"):
        open_slide(tmp_path / "absent.svs")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(NotASlideError, match="not a slide OpenSlide can read"):
        open_slide(text)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableSlideError, match="empty file"):
        open_slide(empty)
    data = slide_file[0].read_bytes()
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableSlideError, match="truncated file"):
        open_slide(truncated)


def test_transparent_areas_become_white_not_black(slide_file):
    slide = open_slide(slide_file[0])
    # Half of this read lies outside the slide, where OpenSlide returns alpha 0.
    rgb = read_rgb(slide, (448, 0), 0, (128, 16))
    assert (rgb[:, 64:] == 255).all()
    rgba = np.array([[[0, 0, 0, 0], [100, 50, 20, 255], [200, 0, 0, 128]]], np.uint8)
    out = rgba_to_rgb_white(rgba)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [100, 50, 20])
    # 200·128/255 + 255·127/255 = 227.4 and 127
    np.testing.assert_array_equal(out[0, 2], [227, 127, 127])


class _FakeSlide:
    def __init__(self, **metadata):
        self._metadata = SlideMetadata(**metadata)

    def metadata(self):
        return self._metadata


def test_mpp_resolution_order():
    every = _FakeSlide(vendor_mpp_xy=(0.25, 0.25), ome_mpp_xy=(0.3, 0.3), objective_power=20.0)
    assert resolve_mpp(every, 0.5) == (0.5, "manifest")
    assert resolve_mpp(every, None) == (0.25, "slide")
    assert resolve_mpp(_FakeSlide(ome_mpp_xy=(0.3, 0.34), objective_power=20.0), None) == (0.32, "ome-physical-size")
    assert resolve_mpp(_FakeSlide(objective_power=40.0), None) == (0.25, "objective-power")
    with pytest.raises(NoMppError, match="manifest's mpp column"):
        resolve_mpp(_FakeSlide(), None)
    with pytest.raises(NoMppError, match="must be positive"):
        resolve_mpp(every, 0.0)


def test_openslide_properties_give_the_vendor_mpp_and_objective_power(slide_file):
    slide = open_slide(slide_file[0])
    assert resolve_mpp(slide, None) == (0.5, "slide")
    assert OpenSlideReader(slide).metadata().objective_power is None


def test_slide_without_mpp_fails_clearly(tmp_path):
    path = tmp_path / "nompp.tif"
    write_synthetic_slide(path, width=256, height=256, mpp=0.5, with_mpp=False)
    slide = open_slide(path)
    with pytest.raises(NoMppError, match="no MPP"):
        resolve_mpp(slide, None)
    assert resolve_mpp(slide, 0.3) == (0.3, "manifest")


def test_fingerprints(tmp_path, slide_file):
    path = slide_file[0]
    slide = open_slide(path)
    assert fingerprint(path, slide).startswith("quickhash-1:")
    plain = fingerprint(path)
    assert plain.startswith("sha256-head-tail:") and plain == fingerprint(path)
    other = tmp_path / "other.tif"
    write_synthetic_slide(other, width=512, height=384, mpp=0.5, tissue_rects=[(0, 0, 128, 384)])
    assert fingerprint(other) != plain
    assert fingerprint(other, open_slide(other)) != fingerprint(path, slide)
