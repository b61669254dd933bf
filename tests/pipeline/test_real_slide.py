"""The real slide through process_slide into a store with each codec (slow; runs in CI)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import ManifestRow
from pipeline.process import ProcessSettings, process_slide
from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import read_table, write_table
from pipeline.schema.format import StoreAttrs
from pipeline.schema.reader import open_store
from pipeline.slide import open_slide, read_rgb
from pipeline.store_writer import create_store
from pipeline.tissue import TissueSettings

R = 224
# Mean absolute difference from an independent read + area resize, in grey levels; JPEG
# q90 on 5× tissue (much fine detail) loses about 5 grey levels, so it also gets a PSNR floor.
TOLERANCE = {"none": 2.0, "zstd": 2.0, "jpeg": 8.0}
JPEG_MIN_PSNR_DB = 28.0  # measured ≈ 29.7 dB on these regions


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["none", "zstd", "jpeg"])
@pytest.mark.parametrize(("magnification", "target_mpp", "expected"), [(5.0, 2.0, range(1, 4)), (10.0, 1.0, range(7, 12))])
def test_real_slide_store_matches_independent_reads(tmp_path, real_slide_path, codec, magnification, target_mpp, expected):
    store = tmp_path / "real.zarr"
    create_store(
        store,
        StoreAttrs(
            magnification=magnification, mpp=target_mpp, region_size=R, min_foreground=0.5,
            codec=codec_settings(codec), segmentation=TissueSettings().to_json(), pipeline_version="0.1.0",
        ),
    )
    row = ManifestRow(slide_id="cmu", path=str(real_slide_path), case_id="cmu_1")
    result = process_slide(row, str(store), ProcessSettings(target_mpp=target_mpp, codec=codec))
    assert result.ok, result.failure
    assert result.n_regions in expected
    write_table(store, read_table(store).with_slide(result.record))
    reader = open_store(store)
    reader.verify_slide("cmu")
    arrays = reader.read_slide("cmu")
    keys = arrays.coords[:, 0].astype(int) * 1000 + arrays.coords[:, 1]
    assert (np.diff(keys) > 0).all(), "regions must be in row-major order"
    regions = np.asarray(arrays.regions[:])
    assert regions.shape == (result.n_regions, R, R, 3) and regions.dtype == np.uint8
    slide = open_slide(real_slide_path)
    step = arrays.attrs["step"]
    side = int(np.ceil(step))
    for (x, y), region in zip(arrays.origin, regions):
        raw = Image.fromarray(read_rgb(slide, (int(x), int(y)), 0, (side, side)))
        reference = np.asarray(raw.resize((R, R), Image.Resampling.BOX, box=(0, 0, step, step)))
        difference = region.astype(float) - reference
        assert np.abs(difference).mean() < TOLERANCE[codec]
        if codec == "jpeg":
            assert 10 * np.log10(255**2 / np.mean(difference**2)) > JPEG_MIN_PSNR_DB
