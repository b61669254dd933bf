"""DeiT-style image augmentation on PIL images and uint8 arrays, without torchvision.

Train: RandomResizedCrop(R, scale (0.08, 1), ratio (3/4, 4/3), bicubic) →
horizontal flip (p 0.5) → RandAugment "rand-m9-mstd0.5-inc1" (2 ops, magnitude
9 ± N(0, 0.5) out of 10, each op applied with p 0.5, the "increasing" op
variants) → random erasing (p 0.25, per-pixel noise). Eval: resize the shorter
side to R / 0.875 (bicubic), centre crop R. Optional Mixup (α 0.8) / CutMix
(α 1.0) of two images with a label-smoothed (0.1) soft target.

Every random draw comes from the `np.random.Generator` passed in, so a sample's
augmentation is a function of that generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BICUBIC = Image.Resampling.BICUBIC
# ImageNet mean / std in pixel units: the fill colour of geometric ops and the
# distribution of erasing noise (N(0, 1) after normalisation).
IMAGENET_MEAN_PX = (124, 116, 104)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255.0


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


# --- RandAugment ops: (image, strength ∈ [0, 1], rng) → image -----------------


def _signed(strength: float, rng: np.random.Generator) -> float:
    return strength if rng.random() < 0.5 else -strength


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, BICUBIC, fillcolor=IMAGENET_MEAN_PX)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16)
    shifted = np.where(pixels < threshold, np.minimum(pixels + add, 255), pixels)
    return Image.fromarray(shifted.astype(np.uint8))


def _enhance(kind: type) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    def op(image: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
        return kind(image).enhance(1.0 + _signed(0.9 * s, rng))

    return op


RAND_AUGMENT_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "AutoContrast": lambda im, s, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, s, rng: ImageOps.equalize(im),
    "Invert": lambda im, s, rng: ImageOps.invert(im),
    "Rotate": lambda im, s, rng: im.rotate(_signed(30.0 * s, rng), BICUBIC, fillcolor=IMAGENET_MEAN_PX),
    "Posterize": lambda im, s, rng: ImageOps.posterize(im, max(1, 4 - int(4 * s))),
    "Solarize": lambda im, s, rng: ImageOps.solarize(im, 256 - int(256 * s)),
    "SolarizeAdd": lambda im, s, rng: _solarize_add(im, int(110 * s)),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda im, s, rng: _affine(im, (1, _signed(0.3 * s, rng), 0, 0, 1, 0)),
    "ShearY": lambda im, s, rng: _affine(im, (1, 0, 0, _signed(0.3 * s, rng), 1, 0)),
    "TranslateX": lambda im, s, rng: _affine(im, (1, 0, _signed(0.45 * s, rng) * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, s, rng: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * s, rng) * im.size[1])),
}


def rand_augment(image: Image.Image, config: RandAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """`config.num_ops` ops drawn uniformly (with replacement), each applied with `config.prob`."""
    names = list(RAND_AUGMENT_OPS)
    for _ in range(config.num_ops):
        name = names[int(rng.integers(len(names)))]
        if rng.random() >= config.prob:
            continue
        magnitude = config.magnitude + (rng.normal(0.0, config.magnitude_std) if config.magnitude_std > 0 else 0.0)
        strength = float(np.clip(magnitude, 0.0, config.max_magnitude)) / config.max_magnitude
        image = RAND_AUGMENT_OPS[name](image, strength, rng)
    return image


# --- uint8 array ops ----------------------------------------------------------


def random_erase(
    pixels: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """With probability `prob`, fill one random rectangle of `pixels` (H, W, 3) uint8 with
    per-pixel noise (ImageNet mean ± std per channel, i.e. N(0, 1) once normalised).

    Area fraction ∈ `area`, aspect log-uniform in `ratio`, up to 10 tries. Returns a new array.
    """
    if rng.random() >= prob:
        return pixels
    height, width = pixels.shape[:2]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            noise = rng.normal(IMAGENET_MEAN, IMAGENET_STD, size=(h, w, 3))
            out = pixels.copy()
            out[top : top + h, left : left + w] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
            return out
    return pixels


def train_transform(image: Image.Image, size: int, config: TrainAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The DeiT train pipeline: RGB PIL image → (size, size, 3) uint8."""
    image = random_resized_crop(image.convert("RGB"), size, rng, scale=config.scale, ratio=config.ratio)
    if rng.random() < config.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if config.rand_augment is not None:
        image = rand_augment(image, config.rand_augment, rng)
    pixels = np.array(image, dtype=np.uint8)  # a writable copy: PIL's buffer view is read-only
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
    """Mix two (H, W, 3) uint8 images: Mixup (blend, λ ~ Beta(α_mix)) or CutMix (paste a box
    of `second`, λ ~ Beta(α_cut), corrected to the pasted area), CutMix with `switch_prob`.

    Returns the mixed image (H, W, 3) uint8 and the soft target (num_classes,) float32
    λ·smooth(first_label) + (1 − λ)·smooth(second_label), which sums to 1.
    """
    if first.shape != second.shape:
        raise ValueError(f"cannot mix images of shapes {first.shape} and {second.shape}")
    lam = 1.0
    image = first
    if rng.random() < config.prob:
        use_cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or rng.random() < config.switch_prob)
        if use_cutmix:
            image, lam = _cutmix(first, second, float(rng.beta(config.cutmix_alpha, config.cutmix_alpha)), rng)
        elif config.mixup_alpha > 0:
            lam = float(rng.beta(config.mixup_alpha, config.mixup_alpha))
            blended = lam * first.astype(np.float32) + (1.0 - lam) * second.astype(np.float32)
            image = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    target = lam * smooth_one_hot(first_label, num_classes, config.label_smoothing) + (1.0 - lam) * smooth_one_hot(
        second_label, num_classes, config.label_smoothing
    )
    return image, target.astype(np.float32)


def _cutmix(first: np.ndarray, second: np.ndarray, lam: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Paste a box of area ≈ (1 − lam) of `second` into `first`; return it and the true λ."""
    height, width = first.shape[:2]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    out = first.copy()
    out[top:bottom, left:right] = second[top:bottom, left:right]
    return out, 1.0 - float((bottom - top) * (right - left)) / (height * width)
