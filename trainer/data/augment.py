"""DeiT-style image augmentation on PIL images and uint8 arrays (torchvision/timm cannot be
imported with this project's CPU torch, so the maintained ops come from kornia).

Train: RandomResizedCrop(R, scale (0.08, 1), ratio (3/4, 4/3), bicubic; PIL) →
horizontal flip (p 0.5) → RandAugment "rand-m9-mstd0.5-inc1" with timm's sampling
(2 ops drawn with replacement, each applied with p 0.5, magnitude 9 ± N(0, 0.5)
out of 10) over kornia's RandAugment ops (`kornia.augmentation.auto.RandAugment`,
its default policy with timm's ±45 % translation) → random erasing (p 0.25,
`kornia.augmentation.RandomErasing`, area 2–33 %, aspect 0.3–3.3). Eval: resize the
shorter side to R / 0.875 (bicubic), centre crop R. Optional Mixup (α 0.8) / CutMix
(α 1.0) of two images with a label-smoothed (0.1) soft target (kornia's
`RandomMixUpV2` / `RandomCutMixV2` with the pair fixed).

Every random draw comes from the `np.random.Generator` passed in: kornia samples from
torch's global RNG, so each kornia call runs inside `torch.random.fork_rng` seeded from
that generator, and a sample's augmentation stays a function of its (seed, epoch,
index) whatever the worker and the global RNG state.

Differences from timm's implementation, all kornia's op definitions: geometric ops fill
with black (timm: the mean colour); the enhance ops (colour, contrast, brightness,
sharpness) map the magnitude onto factors 0.1 → 1.9 rather than 1 ± 0.9·m; erasing
fills with one grey value rather than per-pixel noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from kornia.augmentation import RandomCutMixV2, RandomErasing, RandomMixUpV2
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
# ImageNet mean / std in pixel units: the fill colour of geometric ops and the
# distribution of erasing noise (N(0, 1) after normalisation).
ERASE_VALUE = 0.449  # mean of the ImageNet channel means, on [0, 1]
# kornia's default RandAugment candidates with timm's translation range (±45 % of the size)
RAND_AUGMENT_POLICY = [
    [(name, -0.45, 0.45)] if name in ("translate_x", "translate_y") else [(name, low, high)]
    for [(name, low, high)] in default_policy
]


@dataclass(frozen=True, kw_only=True)
class RandAugmentConfig:
    """RandAugment: `num_ops` ops per image, magnitude out of `max_magnitude`.

    magnitude_std: per-op Gaussian noise on the magnitude (clipped to [0, max]).
    prob: chance each chosen op is actually applied.
    """

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    max_magnitude: float = 10.0
    prob: float = 0.5

    def __post_init__(self) -> None:
        if self.num_ops < 0 or self.max_magnitude <= 0 or self.magnitude_std < 0:
            raise ValueError(f"RandAugment needs num_ops ≥ 0, max_magnitude > 0, magnitude_std ≥ 0: {self}")
        _check_probability("RandAugment prob", self.prob)


@dataclass(frozen=True, kw_only=True)
class TrainAugmentConfig:
    """The train-time pipeline; `rand_augment=None` turns RandAugment off.

    scale: crop area as a fraction of the image; ratio: crop aspect (w / h) range.
    hflip: flip probability; erase_prob: random-erasing probability.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: RandAugmentConfig | None = field(default_factory=RandAugmentConfig)
    erase_prob: float = 0.25
    erase_area: tuple[float, float] = (0.02, 1 / 3)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)

    def __post_init__(self) -> None:
        # recipes (TOML/JSON) give lists and nested tables: normalise them
        for name in ("scale", "ratio", "erase_area", "erase_ratio"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"augment {name} must be a range (low, high) with 0 < low <= high, got {value}")
            object.__setattr__(self, name, value)
        if self.scale[1] > 1 or self.erase_area[1] > 1:
            raise ValueError("augment scale and erase_area are fractions of the image: at most 1")
        if isinstance(self.rand_augment, dict):
            object.__setattr__(self, "rand_augment", RandAugmentConfig(**self.rand_augment))
        _check_probability("augment hflip", self.hflip)
        _check_probability("augment erase_prob", self.erase_prob)


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """In-dataset Mixup / CutMix (DeiT: batch-level; here the pair is a second random image).

    prob: chance of mixing a sample at all; switch_prob: chance of CutMix over Mixup.
    label_smoothing: ε of the smoothed one-hot targets that get mixed.
    """

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    prob: float = 1.0
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mix alphas must be ≥ 0, got mixup {self.mixup_alpha}, cutmix {self.cutmix_alpha}")
        for name in ("switch_prob", "prob", "label_smoothing"):
            _check_probability(f"mix {name}", getattr(self, name))


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# --- geometry ---------------------------------------------------------------


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """A random crop of area fraction ∈ scale and aspect ∈ ratio (log-uniform), resized
    to `size`×`size` bicubic; after 10 misses, the centre crop clamped to `ratio`."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return image.resize((size, size), BICUBIC, box=(left, top, left + w, top + h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), BICUBIC, box=(left, top, left + w, top + h))


def resize_centre_crop(image: Image.Image, size: int, crop_fraction: float = 0.875) -> Image.Image:
    """Eval transform: shorter side → int(size / crop_fraction) bicubic, centre crop size×size."""
    short = int(size / crop_fraction)
    width, height = image.size
    if width <= height:
        new = (short, max(short, int(round(height * short / width))))
    else:
        new = (max(short, int(round(width * short / height))), short)
    image = image.resize(new, BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


# --- RandAugment and random erasing: kornia, seeded from the sample's generator -------


def _kornia_seed(rng: np.random.Generator) -> int:
    """A torch seed drawn from the sample's generator (kornia samples from torch's global RNG)."""
    return int(rng.integers(0, 2**63 - 1))


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 255.0


def _to_pixels(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] → (H, W, 3) uint8 (a new, C-contiguous array)."""
    return np.ascontiguousarray((image[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _rand_augment_tensor(image: torch.Tensor, config: RandAugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """timm's sampling around kornia's RandAugment ops: `num_ops` draws with replacement (one
    kornia `RandAugment(n=1)` each), each applied with `prob`, magnitude + N(0, std) clipped to
    [0, max], mapped to kornia's (0, 30) scale. Call inside a torch RNG seeded for the sample."""
    for _ in range(config.num_ops):
        if rng.random() >= config.prob:
            continue
        magnitude = config.magnitude + (rng.normal(0.0, config.magnitude_std) if config.magnitude_std > 0 else 0.0)
        strength = float(np.clip(magnitude, 0.0, config.max_magnitude)) / config.max_magnitude
        m = float(np.clip(30.0 * strength, 1e-3, 30.0 - 1e-3))  # kornia wants m in (0, 30)
        image = RandAugment(n=1, m=m, policy=RAND_AUGMENT_POLICY)(image).clamp(0.0, 1.0)
    return image


def rand_augment(pixels: np.ndarray, config: RandAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """RandAugment of an (H, W, 3) uint8 image (kornia's ops, timm's sampling); a new array.

    All randomness comes from `rng` (kornia's draws run under a torch RNG seeded from it).
    """
    seed = _kornia_seed(rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _to_pixels(_rand_augment_tensor(_to_tensor(pixels), config, rng))


def random_erase(
    pixels: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """With probability `prob` (drawn from `rng`), kornia's `RandomErasing` of one rectangle of
    `pixels` (H, W, 3) uint8: area fraction ∈ `area`, aspect ∈ `ratio`, filled with the ImageNet
    mean grey (`ERASE_VALUE`; timm fills with per-pixel noise, kornia with one value).
    Returns `pixels` itself when nothing is erased, else a new array."""
    if rng.random() >= prob:
        return pixels
    seed = _kornia_seed(rng)
    eraser = RandomErasing(scale=area, ratio=ratio, value=ERASE_VALUE, p=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _to_pixels(eraser(_to_tensor(pixels)))


def train_transform(image: Image.Image, size: int, config: TrainAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The DeiT train pipeline: RGB PIL image → (size, size, 3) uint8."""
    image = random_resized_crop(image.convert("RGB"), size, rng, scale=config.scale, ratio=config.ratio)
    if rng.random() < config.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.array(image, dtype=np.uint8)  # a writable copy: PIL's buffer view is read-only
    if config.rand_augment is not None:
        pixels = rand_augment(pixels, config.rand_augment, rng)
    if config.erase_prob > 0:
        pixels = random_erase(pixels, rng, prob=config.erase_prob, area=config.erase_area, ratio=config.erase_ratio)
    return pixels


def eval_transform(image: Image.Image, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """The eval pipeline: RGB PIL image → (size, size, 3) uint8."""
    return np.array(resize_centre_crop(image.convert("RGB"), size, crop_fraction), dtype=np.uint8)


# --- Mixup / CutMix -------------------------------------------------------------


def smooth_one_hot(label: int, num_classes: int, smoothing: float) -> np.ndarray:
    """(num_classes,) float32: 1 − ε + ε/K at `label`, ε/K elsewhere (sums to 1)."""
    target = np.full(num_classes, smoothing / num_classes, dtype=np.float64)
    target[label] += 1.0 - smoothing
    return target.astype(np.float32)


def mix_pair(
    first: np.ndarray,
    second: np.ndarray,
    first_label: int,
    second_label: int,
    num_classes: int,
    config: MixConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Mix two (H, W, 3) uint8 images with kornia: Mixup (`RandomMixUpV2`, blend weight
    λ ~ Beta(α_mix) of `first`, drawn from `rng` since kornia's own λ is uniform) or CutMix
    (`RandomCutMixV2`, box from Beta(α_cut), λ = the area left to `first`), CutMix with
    `switch_prob`. kornia pairs images by a random permutation; the pair is fixed here
    (`first` takes from `second`), and its box draws run under a torch RNG seeded from `rng`.

    Returns the mixed image (H, W, 3) uint8 and the soft target (num_classes,) float32
    λ·smooth(first_label) + (1 − λ)·smooth(second_label), which sums to 1.
    """
    if first.shape != second.shape:
        raise ValueError(f"cannot mix images of shapes {first.shape} and {second.shape}")
    taken = 0.0  # 1 − λ: the share of `second`
    image = first
    if rng.random() < config.prob:
        use_cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or rng.random() < config.switch_prob)
        if use_cutmix or config.mixup_alpha > 0:
            lam = 1.0 if use_cutmix else float(rng.beta(config.mixup_alpha, config.mixup_alpha))
            batch = torch.cat([_to_tensor(first), _to_tensor(second)])
            labels = torch.tensor([0, 1])
            seed = _kornia_seed(rng)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if use_cutmix:
                    mixer = RandomCutMixV2(beta=config.cutmix_alpha, p=1.0, data_keys=["input", "class"])
                    params = mixer.forward_parameters(batch.shape)
                    params["mix_pairs"] = torch.tensor([[1, 0]])
                    mixed, mixed_labels = mixer(batch, labels, params=params)
                    taken = float(mixed_labels[0, 0, 2])
                else:
                    mixer = RandomMixUpV2(p=1.0, data_keys=["input", "class"])
                    params = mixer.forward_parameters(batch.shape)
                    params["mixup_pairs"] = torch.tensor([1, 0])
                    params["mixup_lambdas"] = torch.full((2,), 1.0 - lam)
                    mixed, _ = mixer(batch, labels, params=params)
                    taken = 1.0 - lam
            image = _to_pixels(mixed[:1])
    target = (1.0 - taken) * smooth_one_hot(first_label, num_classes, config.label_smoothing) + taken * smooth_one_hot(
        second_label, num_classes, config.label_smoothing
    )
    return image, target.astype(np.float32)
