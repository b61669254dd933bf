"""`ImageFolderDataset`: an ImageNet-style folder as one-region "slides" (thesis §4.1).

root/<class>/<image>.{jpg,jpeg,png,tif,tiff,bmp}; classes sorted by name → ids
0..K−1. Each sample has the tile dataset's keys with n = 1 region, so the same
engine and model (Region Fusion off) train on it. Train samples go through the
DeiT augmentation of `trainer.data.augment`; eval samples through resize +
centre crop.

Randomness: sample i of epoch e draws from `np.random.default_rng([seed, e, i])`,
so augmentation is reproducible and independent of worker count and order.
`set_epoch(e)` reaches DataLoader workers only when they are re-created each
epoch (the default `persistent_workers=False`).

Mixup / CutMix (off by default): DeiT mixes within a batch; with one sample per
step the dataset pairs each image with a second random training image instead
and adds `target`: (K,) float32 soft label (label-smoothed, mixed by λ, sums to
1). `label` stays the first image's class. Train the head on `target` (soft
cross-entropy) when it is present.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from trainer.data.augment import MixConfig, TrainAugmentConfig, eval_transform, mix_pair, train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

Sample = dict[str, Any]


class ImageFolderDataset(Dataset[Sample]):
    """Images of class sub-folders, one (1, R, R, 3) uint8 region per sample.

    root: folder with one sub-folder per class.
    train: DeiT train augmentation (True) or resize + centre crop (False).
    region_size: R in pixels.
    augment: the train pipeline's settings; crop_fraction: eval crop (0.875: 256 → 224).
    mix: Mixup/CutMix settings, None (default) for no mixing; train only.
    label_map: {class name: id} of the training folder, for a validation folder
        (its classes must all be in it); None maps sorted class names to 0..K−1.
    seed: base of every random draw (see the module docstring).

    Sample: regions (1, R, R, 3) torch.uint8; coords (1, 2) int64 zeros; label long
    scalar; slide_id str (path relative to root); index int; with mixing also
    target (K,) float32.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: bool,
        region_size: int = 224,
        *,
        augment: TrainAugmentConfig | None = None,
        crop_fraction: float = 0.875,
        mix: MixConfig | None = None,
        label_map: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        if region_size < 1:
            raise ValueError(f"region_size must be positive, got {region_size}")
        if mix is not None and not train:
            raise ValueError("Mixup/CutMix is a training augmentation; pass mix=None for evaluation")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {self.root} has no class sub-folders (expected root/<class>/<image>)")
        if label_map is None:
            self.label_map = {name: i for i, name in enumerate(classes)}
        else:
            self.label_map = {str(k): int(v) for k, v in label_map.items()}
            unknown = sorted(set(classes) - set(self.label_map))
            if unknown:
                raise ValueError(f"classes {unknown} of {self.root} are not in the given label_map")
        self.samples: list[tuple[str, int]] = []
        for name in classes:
            files = sorted(
                p for p in (self.root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.samples += [(str(p.relative_to(self.root)), self.label_map[name]) for p in files]
        if not self.samples:
            raise ValueError(f"image folder {self.root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.train = train
        self.region_size = int(region_size)
        self.augment = augment if augment is not None else TrainAugmentConfig()
        self.crop_fraction = crop_fraction
        self.mix = mix
        self.seed = seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return max(self.label_map.values()) + 1

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch`'s augmentation draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = int(index) % len(self)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pixels = self._load(index, rng)
        sample: Sample = {
            "label": torch.tensor(self.samples[index][1], dtype=torch.long),
            "coords": torch.zeros((1, 2), dtype=torch.int64),
            "slide_id": self.samples[index][0],
            "index": index,
        }
        if self.mix is not None:
            partner = int(rng.integers(len(self)))
            pixels, target = mix_pair(
                pixels, self._load(partner, rng), self.samples[index][1], self.samples[partner][1],
                self.num_classes, self.mix, rng,
            )
            sample["target"] = torch.from_numpy(target)
        sample["regions"] = torch.from_numpy(pixels).unsqueeze(0)
        return sample

    def _load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Image `index` transformed: (R, R, 3) uint8."""
        path = self.root / self.samples[index][0]
        try:
            with Image.open(path) as image:
                image.load()
                if self.train:
                    return train_transform(image, self.region_size, self.augment, rng)
                return eval_transform(image, self.region_size, self.crop_fraction)
        except OSError as error:
            raise OSError(f"cannot read image {path}: {error}") from error


def make_tiny_image_folder(
    root: str | os.PathLike[str],
    classes: int = 2,
    per_class: int = 8,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """Write a tiny ImageNet-style folder whose classes differ visibly; returns `root`.

    Class c: its own base colour and stripe orientation (horizontal, vertical,
    diagonal, checker, ...), plus noise; sizes vary a little around `size` and
    images alternate PNG / JPEG so loading and resizing are exercised.
    Folders are named class_00, class_01, ...
    """
    if classes < 1 or per_class < 1 or size < 8:
        raise ValueError("need classes >= 1, per_class >= 1 and size >= 8")
    root = Path(root)
    rng = np.random.default_rng(seed)
    palette = [(200, 60, 60), (60, 80, 200), (60, 170, 70), (210, 180, 50), (150, 60, 170), (40, 170, 170)]
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(palette[c % len(palette)], dtype=np.float32)
        if c >= len(palette):
            base = np.clip(base * (0.5 + 0.5 * rng.random()), 0, 255)
        for i in range(per_class):
            height = size + int(rng.integers(-size // 8, size // 8 + 1))
            width = size + int(rng.integers(-size // 8, size // 8 + 1))
            yy, xx = np.mgrid[0:height, 0:width]
            stripes = _pattern(c, yy, xx, period=max(4, size // 8))
            pixels = base[None, None, :] * (0.6 + 0.4 * stripes[..., None])
            pixels += rng.normal(0.0, 12.0, size=pixels.shape)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            suffix = ".png" if i % 2 == 0 else ".jpg"
            image.save(folder / f"img_{i:03d}{suffix}")
    return root


def _pattern(class_id: int, yy: np.ndarray, xx: np.ndarray, period: int) -> np.ndarray:
    """A 0/1 texture per class: stripes in one of four orientations, then checkers."""
    kind = class_id % 4
    if kind == 0:
        phase = yy
    elif kind == 1:
        phase = xx
    elif kind == 2:
        phase = xx + yy
    else:
        return (((yy // period) + (xx // period)) % 2).astype(np.float32)
    return ((phase // period) % 2).astype(np.float32)
