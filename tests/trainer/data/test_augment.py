"""DeiT-style augmentation: shapes, determinism under a seed (kornia's draws included), targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.augment import (
    ERASE_VALUE,
    RAND_AUGMENT_POLICY,
    MixConfig,
    RandAugmentConfig,
    TrainAugmentConfig,
    eval_transform,
    mix_pair,
    rand_augment,
    random_erase,
    random_resized_crop,
    resize_centre_crop,
    smooth_one_hot,
    train_transform,
)


def picture(width: int = 60, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 4 % 256, yy * 6 % 256, (xx + yy) * 3 % 256], axis=-1) + rng.integers(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_random_resized_crop_size_and_determinism():
    image = picture()
    a = random_resized_crop(image, 32, np.random.default_rng(1))
    b = random_resized_crop(image, 32, np.random.default_rng(1))
    c = random_resized_crop(image, 32, np.random.default_rng(2))
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    # an impossible aspect range falls back to the clamped centre crop
    fallback = random_resized_crop(image, 16, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(4.0, 5.0))
    expected = image.resize((16, 16), Image.Resampling.BICUBIC, box=(0, 12, 60, 27))  # 60×15: ratio 4, centred
    assert np.array_equal(np.asarray(fallback), np.asarray(expected))


def test_resize_centre_crop_matches_deit_eval():
    image = picture(width=80, height=64)
    out = resize_centre_crop(image, 56)  # shorter side → int(56 / 0.875) = 64: no resize needed
    assert out.size == (56, 56)
    assert np.array_equal(np.asarray(out), np.asarray(image.crop((12, 4, 68, 60))))
    assert eval_transform(picture(30, 50), 24).shape == (24, 24, 3)


def test_rand_augment_uses_timms_translation_range_over_kornias_policy():
    names = [entry[0][0] for entry in RAND_AUGMENT_POLICY]
    assert len(names) == 15 and {"rotate", "solarize_add", "shear_x", "posterize"} <= set(names)
    assert dict((e[0][0], e[0][1:]) for e in RAND_AUGMENT_POLICY)["translate_x"] == (-0.45, 0.45)


def test_rand_augment_is_seeded_and_can_be_identity():
    pixels = np.asarray(picture())
    config = RandAugmentConfig()
    a = rand_augment(pixels, config, np.random.default_rng(5))
    torch.manual_seed(123)  # kornia draws from torch's global RNG: rand_augment must not depend on it
    state = torch.get_rng_state()
    b = rand_augment(pixels, config, np.random.default_rng(5))
    assert torch.equal(torch.get_rng_state(), state)  # ... nor disturb it
    assert a.shape == pixels.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    changed = [not np.array_equal(rand_augment(pixels, config, np.random.default_rng(s)), pixels) for s in range(6)]
    assert any(changed)
    never = RandAugmentConfig(prob=0.0)
    assert np.array_equal(rand_augment(pixels, never, np.random.default_rng(5)), pixels)


def test_random_erase_fills_one_rectangle():
    pixels = np.full((40, 40, 3), 7, np.uint8)
    assert random_erase(pixels, np.random.default_rng(0), prob=0.0) is pixels
    for seed in range(3):
        out = random_erase(pixels, np.random.default_rng(seed), prob=1.0)
        changed = np.any(out != pixels, axis=-1)
        rows, cols = np.nonzero(changed)
        assert rows.size > 0
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # one filled rectangle
        assert np.all(out[changed] == round(ERASE_VALUE * 255))
        assert 0.02 * 1600 * 0.5 <= box.size <= 1600 / 3 * 1.5
        assert np.array_equal(out, random_erase(pixels, np.random.default_rng(seed), prob=1.0))
    assert pixels.max() == 7  # input untouched


def test_train_transform_output_and_seed():
    image = picture(90, 70)
    config = TrainAugmentConfig(erase_prob=1.0)
    a = train_transform(image, 48, config, np.random.default_rng(3))
    b = train_transform(image, 48, config, np.random.default_rng(3))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, b)
    assert not np.array_equal(a, train_transform(image, 48, config, np.random.default_rng(4)))


def test_smooth_one_hot():
    target = smooth_one_hot(2, 4, 0.1)
    assert target.dtype == np.float32 and target.sum() == pytest.approx(1.0)
    assert target[2] == pytest.approx(0.925) and target[0] == pytest.approx(0.025)


def test_mixup_and_cutmix_targets():
    first = np.zeros((32, 32, 3), np.uint8)
    second = np.full((32, 32, 3), 200, np.uint8)
    mixup = MixConfig(cutmix_alpha=0.0)
    image, target = mix_pair(first, second, 0, 1, 3, mixup, np.random.default_rng(0))
    lam = 1.0 - image.mean() / 200.0
    assert target.sum() == pytest.approx(1.0, abs=1e-6)
    assert target[0] == pytest.approx(lam * 0.9 + 0.1 / 3, abs=0.01)
    assert len(np.unique(image)) == 1  # a uniform blend
    cutmix = MixConfig(mixup_alpha=0.0)
    for seed in range(5):
        image, target = mix_pair(first, second, 0, 1, 3, cutmix, np.random.default_rng(seed))
        pasted = np.mean(image[..., 0] == 200)
        assert target[1] == pytest.approx(pasted * 0.9 + 0.1 / 3, abs=1e-6)  # λ corrected to the box area
        assert target.sum() == pytest.approx(1.0, abs=1e-6)
    off = MixConfig(prob=0.0)
    image, target = mix_pair(first, second, 2, 1, 3, off, np.random.default_rng(0))
    assert np.array_equal(image, first) and np.allclose(target, smooth_one_hot(2, 3, 0.1))
    with pytest.raises(ValueError, match="shapes"):
        mix_pair(first, second[:16], 0, 1, 3, mixup, np.random.default_rng(0))


def test_configs_accept_recipe_values_and_reject_bad_ones():
    config = TrainAugmentConfig(scale=[0.2, 1], rand_augment={"num_ops": 1, "magnitude": 5})
    assert config.scale == (0.2, 1.0) and config.rand_augment == RandAugmentConfig(num_ops=1, magnitude=5)
    with pytest.raises(ValueError, match="scale"):
        TrainAugmentConfig(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="erase_prob"):
        TrainAugmentConfig(erase_prob=1.5)
    with pytest.raises(ValueError, match="alphas"):
        MixConfig(mixup_alpha=-1)
    with pytest.raises(ValueError, match="RandAugment prob"):
        RandAugmentConfig(prob=2)


def test_mixing_ignores_and_keeps_the_global_rng():
    first = np.zeros((24, 24, 3), np.uint8)
    second = np.full((24, 24, 3), 120, np.uint8)
    for config in (MixConfig(mixup_alpha=0.0), MixConfig(cutmix_alpha=0.0)):
        torch.manual_seed(1)
        a = mix_pair(first, second, 0, 1, 2, config, np.random.default_rng(9))
        torch.manual_seed(2)
        state = torch.get_rng_state()
        b = mix_pair(first, second, 0, 1, 2, config, np.random.default_rng(9))
        assert torch.equal(torch.get_rng_state(), state)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], first)  # the pair is always (first ← second), never an image with itself
