"""Apply a view's drawn augmentation to its regions on the device (kornia functional ops).

The parameters come from `trainer.data.views.View` (drawn in the loader from the
sample's generator); kornia's own random sampling (`kornia.augmentation`) would
draw from the global RNG, so only its deterministic functional ops are used here,
with the parameters passed explicitly.

Per view, in DINO's order: flips → colour jitter (its four ops in the drawn
order) → grayscale → Gaussian blur → solarize. The colour ops treat the view as
ONE image (its regions stacked), so contrast blends towards the mean grey of the
whole view, as if the slide itself had been adjusted; blur runs per region
(reflect padding: regions are separate tiles, not neighbours in memory).
"""

from __future__ import annotations

import math

import kornia
import torch
from torch import Tensor

from trainer.data.views import ColourParams, View

SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize default, on [0, 1] pixels


def _as_image(regions: Tensor) -> Tensor:
    """(k, R, R, 3) uint8 or float → (k, 3, R, R) float32 in [0, 1]."""
    x = regions.float() / 255.0 if regions.dtype == torch.uint8 else regions.float()
    return x.permute(0, 3, 1, 2)


def _jitter(x: Tensor, colour: ColourParams) -> Tensor:
    """Colour jitter on (k, 3, R, R), the view's regions stacked into one (1, 3, k·R, R) image."""
    k, c, r, s = x.shape
    image = x.permute(1, 0, 2, 3).reshape(1, c, k * r, s)
    for op in colour.order:
        if op == 0:
            image = kornia.enhance.adjust_brightness_accumulative(image, colour.brightness)
        elif op == 1:
            image = kornia.enhance.adjust_contrast_with_mean_subtraction(image, colour.contrast)
        elif op == 2:
            image = kornia.enhance.adjust_saturation_with_gray_subtraction(image, colour.saturation)
        else:
            image = kornia.enhance.adjust_hue(image, colour.hue * 2.0 * math.pi)
        image = image.clamp(0.0, 1.0)
    return image.reshape(c, k, r, s).permute(1, 0, 2, 3)


def blur_kernel_size(sigma: float, region_size: int) -> int:
    """Odd kernel covering ±3σ, at most what reflect padding of a region allows."""
    size = 2 * math.ceil(3.0 * sigma) + 1
    largest = region_size if region_size % 2 else region_size - 1
    return max(3, min(size, largest))


def augment_colour(x: Tensor, colour: ColourParams) -> Tensor:
    """x (k, 3, R, R) float in [0, 1] → the same shape with the view's colour ops applied."""
    if colour.jitter:
        x = _jitter(x, colour)
    if colour.grayscale:
        x = kornia.color.rgb_to_grayscale(x).expand(-1, 3, -1, -1)
    if colour.blur_sigma > 0:
        size = blur_kernel_size(colour.blur_sigma, min(x.shape[-2:]))
        sigma = torch.tensor([[colour.blur_sigma, colour.blur_sigma]], device=x.device, dtype=x.dtype)
        x = kornia.filters.gaussian_blur2d(x, (size, size), sigma.expand(x.shape[0], 2), border_type="reflect")
    if colour.solarize:
        x = kornia.enhance.solarize(x, SOLARIZE_THRESHOLD)
    return x


def augment_view(regions: Tensor, view: View) -> Tensor:
    """The view's pixels, augmented: regions (n, R, R, 3) uint8 (the whole slide, on the
    device) → (k, R, R, 3) float32 in [0, 1], k = len(view), in the view's order.

    The model takes float input as already scaled to [0, 1].
    """
    indices = view.indices.to(regions.device)
    x = _as_image(regions.index_select(0, indices))
    dims = [d for d, flag in ((3, view.hflip), (2, view.vflip)) if flag]
    if dims:
        x = torch.flip(x, dims)
    x = augment_colour(x, view.colour)
    return x.permute(0, 2, 3, 1).contiguous()
