"""ImageFolderDataset over a generated tiny folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from trainer.data.augment import MixConfig
from trainer.data.image_folder import ImageFolderDataset, make_tiny_image_folder
from trainer.data.tile_dataset import collate_slide


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_image_folder(tmp_path_factory.mktemp("images") / "train", classes=3, per_class=4, size=40)


def test_tiny_folder_classes_differ_visibly(folder):
    assert sorted(p.name for p in folder.iterdir()) == ["class_00", "class_01", "class_02"]
    means = []
    for name in ("class_00", "class_01", "class_02"):
        files = sorted((folder / name).iterdir())
        assert len(files) == 4 and {f.suffix for f in files} == {".png", ".jpg"}
        means.append(np.mean([np.asarray(Image.open(f)).reshape(-1, 3).mean(0) for f in files], axis=0))
    # each class's mean colour is dominated by its own channel ordering: red, blue, green
    assert [int(np.argmax(m)) for m in means] == [0, 2, 1]


def test_class_ids_and_sample_format(folder):
    ds = ImageFolderDataset(folder, train=False, region_size=32)
    assert ds.label_map == {"class_00": 0, "class_01": 1, "class_02": 2} and ds.num_classes == 3
    assert len(ds) == 12 and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    sample = ds[5]
    assert sample["regions"].shape == (1, 32, 32, 3) and sample["regions"].dtype == torch.uint8
    assert torch.equal(sample["coords"], torch.zeros((1, 2), dtype=torch.int64))
    assert sample["label"].dtype == torch.long and int(sample["label"]) == 1
    assert sample["slide_id"] == "class_01/img_001.jpg" and sample["index"] == 5
    assert "target" not in sample
    assert torch.equal(ds[5]["regions"], sample["regions"])  # eval is deterministic


def test_train_augmentation_is_seeded_per_epoch(folder):
    ds = ImageFolderDataset(folder, train=True, region_size=32, seed=1)
    same = ImageFolderDataset(folder, train=True, region_size=32, seed=1)
    other = ImageFolderDataset(folder, train=True, region_size=32, seed=2)
    a = ds[3]["regions"]
    assert a.shape == (1, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, same[3]["regions"])
    assert not torch.equal(a, other[3]["regions"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[3]["regions"])
    ds.set_epoch(0)
    assert torch.equal(a, ds[3]["regions"])


def test_mixing_adds_a_soft_target(folder):
    ds = ImageFolderDataset(folder, train=True, region_size=32, mix=MixConfig(), seed=0)
    for i in range(len(ds)):
        sample = ds[i]
        target = sample["target"]
        assert target.shape == (3,) and target.dtype == torch.float32
        assert float(target.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(target.min()) >= 0.1 / 3 - 1e-6
        assert int(target.argmax()) == int(sample["label"]) or float(target.max()) < 0.9
    with pytest.raises(ValueError, match="training"):
        ImageFolderDataset(folder, train=False, mix=MixConfig())


def test_validation_folder_uses_training_map(folder, tmp_path):
    val_root = tmp_path / "val"
    (val_root / "class_02").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 200, 10)).save(val_root / "class_02" / "x.bmp")
    val = ImageFolderDataset(val_root, train=False, region_size=16, label_map={"class_00": 0, "class_01": 1, "class_02": 2})
    assert int(val[0]["label"]) == 2 and val.num_classes == 3
    (val_root / "class_09").mkdir()
    with pytest.raises(ValueError, match="class_09"):
        ImageFolderDataset(val_root, train=False, label_map={"class_02": 2})


def test_bad_folders_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", train=True)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, train=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, train=True)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="broken.png"):
        ImageFolderDataset(tmp_path, train=False)[0]


def test_dataloader_with_workers(folder):
    ds = ImageFolderDataset(folder, train=True, region_size=24, seed=0)
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_slide)
    batches = list(loader)
    assert [int(b["index"]) for b in batches] == list(range(len(ds)))
    assert all(torch.equal(b["regions"], ds[b["index"]]["regions"]) for b in batches)
