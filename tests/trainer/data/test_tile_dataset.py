"""TileStoreDataset over stores written by the pipeline's store writer."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import multiprocessing
import pickle
import pickletools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from store_builders import SPECS, SlideSpec, slide_coords, slide_regions
from torch.utils.data import DataLoader

from pipeline import driver
from pipeline.schema.errors import NotATileStoreError
from pipeline.schema.reader import open_store
from pipeline.tissue import TissueSettings
from trainer.data.labels import UnknownLabelError
from trainer.data.samplers import SlideSampler
from trainer.data.splits import by_slide, kfold
from trainer.data.tile_dataset import TileStoreDataset, collate_slide, regions_tensor

SPEC_BY_ID = {spec.slide_id: spec for spec in SPECS}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_samples_equal_what_was_written(stores, codec):
    ds = TileStoreDataset(stores[codec], min_regions=0)
    assert ds.slide_ids == sorted(SPEC_BY_ID)
    for i in range(len(ds)):
        sample = ds[i]
        spec = SPEC_BY_ID[sample["slide_id"]]
        assert sample["index"] == i
        assert sample["regions"].dtype == torch.uint8 and sample["regions"].shape == (spec.n, 32, 32, 3)
        assert sample["coords"].dtype == torch.int64 and sample["coords"].shape == (spec.n, 2)
        assert sample["label"].dtype == torch.long and sample["label"].ndim == 0
        np.testing.assert_array_equal(sample["regions"].numpy(), slide_regions(spec))
        np.testing.assert_array_equal(sample["coords"].numpy(), slide_coords(spec.n))
        expected = -1 if spec.label is None else ds.label_map[spec.label]
        assert int(sample["label"]) == expected


def test_none_and_zstd_identical_and_jpeg_close(stores):
    plain, packed, lossy = (TileStoreDataset(stores[c], min_regions=0) for c in ("none", "zstd", "jpeg"))
    assert len(plain) == len(packed) == len(lossy)
    for i in range(len(plain)):
        a, b, c = plain[i], packed[i], lossy[i]
        assert torch.equal(a["regions"], b["regions"])
        assert torch.equal(a["coords"], c["coords"])
        assert c["regions"].shape == a["regions"].shape and c["regions"].dtype == torch.uint8
        assert psnr(a["regions"].numpy(), c["regions"].numpy()) > 30.0


def test_none_path_is_zero_copy_and_copy_on_write(stores):
    store = open_store(stores["none"])
    mapped = store.read_slide("s01").regions
    assert isinstance(mapped, np.memmap)
    tensor = regions_tensor(mapped)
    chunk_file = str(mapped.filename)
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        spans = [line.split() for line in maps if line.rstrip().endswith(chunk_file)]
    assert any(int(s[0].split("-")[0], 16) <= address < int(s[0].split("-")[1], 16) for s in spans), (
        "the regions tensor is not backed by a mapping of the chunk file"
    )
    tensor[0, 0, 0, 0] = 255 - int(tensor[0, 0, 0, 0])  # lands in a private page, not the store
    fresh = TileStoreDataset(stores["none"], slide_ids=["s01"])[0]["regions"]
    np.testing.assert_array_equal(fresh.numpy(), slide_regions(SPEC_BY_ID["s01"]))


def test_filters_and_report(stores):
    ds = TileStoreDataset(stores["none"], split="train", require_label=True, min_regions=4, max_regions=15)
    # train: s00 s01 s02 s03 s06; s03 has no label, s02 too few regions, s06 too many
    assert ds.slide_ids == ["s00", "s01"]
    assert ds.filter_report == {
        "slides_in_store": 8, "dropped_other_split": 3, "dropped_no_label": 1,
        "dropped_too_few_regions": 1, "dropped_too_many_regions": 1, "kept": 2,
    }
    val = TileStoreDataset(stores["none"], split="val")
    assert val.slide_ids == ["s04", "s05"]
    subset = TileStoreDataset(stores["none"], slide_ids=["s07", "s02", "s05"], min_regions=1)
    assert subset.slide_ids == ["s02", "s05", "s07"]
    assert subset.filter_report["dropped_not_in_subset"] == 5
    thesis = TileStoreDataset(stores["none"])  # defaults 4..999
    assert all(4 <= n <= 999 for n in thesis.n_regions) and "s02" not in thesis.slide_ids


def test_bad_arguments_are_specific(stores, tmp_path):
    with pytest.raises(ValueError, match="not in"):
        TileStoreDataset(stores["none"], slide_ids=["s00", "nope"])
    with pytest.raises(ValueError, match="min_regions"):
        TileStoreDataset(stores["none"], min_regions=10, max_regions=5)
    with pytest.raises(NotATileStoreError):
        TileStoreDataset(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_slide([{}, {}])
    with pytest.raises(IndexError):
        TileStoreDataset(stores["none"])[100]


def test_string_labels_are_sorted_and_map_is_reused(stores):
    train = TileStoreDataset(stores["none"], split="train", min_regions=0)
    assert train.label_map == {"normal": 0, "stroma": 1, "tumour": 2}  # from every slide in the store
    assert train.num_classes == 3
    val = TileStoreDataset(stores["none"], split="val", label_map=train.label_map)
    assert [int(val[i]["label"]) for i in range(len(val))] == [2, 1]
    with pytest.raises(UnknownLabelError, match="'stroma'"):
        TileStoreDataset(stores["none"], split="val", label_map={"normal": 0, "tumour": 1})


def test_integer_labels_stay_integers(store_factory):
    specs = [
        SlideSpec(slide_id="a", n=4, label="3"), SlideSpec(slide_id="b", n=4, label="0"),
        SlideSpec(slide_id="c", n=4, label=5), SlideSpec(slide_id="d", n=4, label=None),
    ]
    ds = TileStoreDataset(store_factory(specs), require_label=True)
    assert ds.label_map == {"0": 0, "3": 3, "5": 5}
    assert [int(ds[i]["label"]) for i in range(len(ds))] == [3, 0, 5]
    assert ds.num_classes == 6


def test_store_without_splits_gets_grouped_complementary_split(store_factory):
    specs = [SlideSpec(slide_id=f"x{i:02d}", n=4, label="a", case_id=f"p{i // 3}") for i in range(30)]
    path = store_factory(specs)
    train = TileStoreDataset(path, split="train", val_fraction=0.3, split_seed=1)
    val = TileStoreDataset(path, split="val", val_fraction=0.3, split_seed=1)
    assert sorted(train.slide_ids + val.slide_ids) == sorted(s.slide_id for s in specs)
    assert {int(s[1:]) // 3 for s in train.slide_ids}.isdisjoint({int(s[1:]) // 3 for s in val.slide_ids})
    assert len(val) == 9  # 3 of 10 patients
    override = TileStoreDataset(path, split="val", split_assignment={"x00": "val", "x01": "train"})
    assert override.slide_ids == ["x00"]
    table = open_store(path).slides
    fold = by_slide(table, kfold(table, k=5, fold=2, seed=0))
    fold_val = TileStoreDataset(path, split="val", split_assignment=fold)
    fold_train = TileStoreDataset(path, split="train", split_assignment=fold)
    assert len(fold_val) == 6 and len(fold_train) == 24
    assert {int(s[1:]) // 3 for s in fold_train.slide_ids}.isdisjoint({int(s[1:]) // 3 for s in fold_val.slide_ids})


def test_pickles_without_a_store_object(stores):
    ds = TileStoreDataset(stores["zstd"])
    first = ds[0]  # opens the reader in this process
    assert ds._store is not None
    data = pickle.dumps(ds)
    modules = {arg.split()[0] for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    modules |= {arg for op, arg, _ in pickletools.genops(data) if op.name in ("SHORT_BINUNICODE", "BINUNICODE")}
    assert "pipeline.schema.reader" not in modules and "zarr.core.array" not in modules
    clone = pickle.loads(data)
    assert clone._store is None
    assert torch.equal(clone[0]["regions"], first["regions"])


@pytest.mark.parametrize("codec", ["none", "jpeg"])
def test_dataloader_with_two_workers(stores, codec):
    ds = TileStoreDataset(stores[codec], min_regions=0)
    ds[0]  # a reader opened in the parent must not be used by the forked workers
    sampler = SlideSampler(ds.labels, seed=3)
    loader = DataLoader(
        ds, batch_size=1, sampler=sampler, num_workers=2, collate_fn=collate_slide,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    seen = []
    for sample in loader:
        reference = ds[sample["index"]]
        assert sample["slide_id"] == reference["slide_id"]
        assert torch.equal(sample["regions"], reference["regions"])
        seen.append(sample["index"])
    assert sorted(seen) == list(range(len(ds)))
    assert seen == list(sampler)


def _synthetic_module():
    """tests/pipeline/synthetic.py (the pipeline's synthetic-slide writer), loaded by path."""
    path = Path(__file__).resolve().parents[2] / "pipeline" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("pipeline_test_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_store_built_by_the_pipeline_from_synthetic_slides(tmp_path):
    synthetic = _synthetic_module()
    # 512×384 px at 0.5 µm/px, tiled at 10× with R = 32: step 64 level-0 px (level 1 read exactly)
    rects = {"big0": (64, 64, 256, 192), "big1": (64, 64, 256, 192), "tiny": (64, 64, 192, 64)}
    images, lines = {}, ["slide_id,path,label,split,case_id"]
    for i, (slide_id, rect) in enumerate(rects.items()):
        path = tmp_path / f"{slide_id}.tif"
        images[slide_id] = synthetic.write_synthetic_slide(
            path, width=512, height=384, mpp=0.5, levels=(1, 2), tissue_rects=[rect], colour=(150 + 30 * i, 70, 160)
        )
        lines.append(f"{slide_id},{path},{'AB'[i % 2]},train,case{i}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    datasets = {}
    for codec in ("none", "zstd"):
        summary = driver.build_store(
            manifest, tmp_path / f"{codec}.zarr", magnification=10, region_size=32, codec=codec, workers=0,
            progress=False, tissue=TissueSettings(min_object_um2=1_000.0),
        )
        assert summary.ok, summary
        datasets[codec] = TileStoreDataset(tmp_path / f"{codec}.zarr", split="train", require_label=True)
    plain, packed = datasets["none"], datasets["zstd"]
    assert plain.slide_ids == ["big0", "big1"] and plain.filter_report["dropped_too_few_regions"] == 1
    assert plain.label_map == {"A": 0, "B": 1} and plain.store_attrs.region_size == 32
    for i in range(len(plain)):
        a, b = plain[i], packed[i]
        assert torch.equal(a["regions"], b["regions"]) and torch.equal(a["coords"], b["coords"])
        level1 = synthetic.block_mean(images[a["slide_id"]], 2)
        assert a["regions"].shape[0] == 12
        for region, (row, col) in zip(a["regions"].numpy(), a["coords"].tolist()):
            np.testing.assert_array_equal(region, level1[row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(stores):
    """The zstd store's folder served over HTTP on a loopback port: its base URL."""
    folder = stores["zstd"].parent
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{stores['zstd'].name}"
    server.shutdown()
    server.server_close()


def test_http_store_with_forked_workers(stores, served):
    local = TileStoreDataset(stores["zstd"], split="train")
    remote = TileStoreDataset(served, split="train")
    assert remote.url == served and remote.slide_ids == local.slide_ids
    remote[0]  # the parent's HTTP session must not be reused by the workers
    loader = DataLoader(
        remote, batch_size=1, num_workers=2, collate_fn=collate_slide,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    for sample in loader:
        assert torch.equal(sample["regions"], local[sample["index"]]["regions"])


def test_empty_store_gives_an_empty_dataset(store_factory):
    ds = TileStoreDataset(store_factory([]), split="train")
    assert len(ds) == 0 and ds.label_map == {} and ds.filter_report["kept"] == 0
