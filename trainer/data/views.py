"""DINO's multi-crop views of a background-filtered slide (thesis §3.3, DESIGN.md §9).

A slide is a set of foreground regions on a grid (`coords (n, 2)` (row, col)).
A *view* is a subset of those regions inside one rectangular window of the grid,
plus the augmentation parameters drawn for it. Everything here is index work on
the CPU, meant for DataLoader workers (`MultiCropPreparer` is the objective's
`sample_preparer()`); the pixels are touched later, on the device, by
`trainer.data.view_augment.augment_view`.

Crop (per view): on the bounding box of the foreground (H × W grid cells)

1. window area a = s · H · W, s ~ U(scale) (global 40–100 %, local 5–40 %);
2. aspect ratio w / h log-uniform over what fits in the box: [a / H², W² / a];
   h = round(√(a / ratio)), w = round(√(a · ratio)), clamped to the box;
3. top-left corner uniform over the positions that keep the window in the box;
4. a region is inside when its grid cell is; accept when the count of inside
   regions, as a fraction of all n, is in the view's range (the same range as
   the scale: global 40–100 %, local 5–40 %) and at least one region is inside.

`trials` (1,000) tries in the view's scale range ("direct"); then `trials` more
with the relaxed window range ("relaxed"; local views 5–100 %, global views keep
40–100 % which is already the widest); then all regions ("fallback"). Trials
are drawn in one batch per phase (a fixed amount of generator output per phase,
so the draws are reproducible) and counted with a summed-area table.

Flips: horizontal and vertical, p 0.5 each, per view. The preparer remaps the
view's coords inside its window (col' = 2·left + w − 1 − col, likewise rows) and
re-sorts the view's region indices row-major by the remapped coords; the pixel
flip of every region (`torch.flip` of its columns / rows) is a flag the device
applies, so the loader never copies pixels.

Colour parameters (DINO's recipe) are drawn once per view and apply to all its
regions: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1,
in a random order, p 0.8), grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2] px with p
1.0 / 0.1 / 0.5 (global 1 / global 2 / locals), solarize p 0.2 on global 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

CROP_PATHS = ("direct", "relaxed", "fallback")


def _range(name: str, value: Any, *, upper: float = 1.0) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not 0.0 < pair[0] <= pair[1] <= upper:
        raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high <= {upper}, got {value!r}")
    return pair  # type: ignore[return-value]


def _probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class ViewConfig:
    """Multi-crop settings (defaults: DINO's recipe with the thesis's WSI crop).

    global_views / local_views: how many of each (the teacher sees the global ones).
    global_scale / local_scale: window area (fraction of the foreground bounding box)
        and the accepted count of foreground regions (fraction of all regions).
    relaxed_local_scale: the local window range of the second `trials` tries.
    trials: tries per phase (thesis: 1,000).
    hflip / vflip: flip probabilities per view.
    jitter_p, brightness, contrast, saturation, hue: colour jitter (torchvision
        semantics: factors U(1 − b, 1 + b), hue shift U(−h, h) turns).
    grayscale_p: probability of grayscale per view.
    blur_p: Gaussian blur probability for (global 1, global 2, locals); blur_sigma in px.
    solarize_p: solarize probability for (global 1, global 2, locals).
    """

    global_views: int = 2
    local_views: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    relaxed_local_scale: tuple[float, float] = (0.05, 1.0)
    trials: int = 1000
    hflip: float = 0.5
    vflip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)

    def __post_init__(self) -> None:
        if self.global_views < 1 or self.local_views < 0 or self.global_views + self.local_views < 2:
            raise ValueError(
                f"need >= 1 global view and >= 2 views in all, got {self.global_views} global, {self.local_views} local"
            )
        for name in ("global_scale", "local_scale", "relaxed_local_scale"):
            object.__setattr__(self, name, _range(name, getattr(self, name)))
        object.__setattr__(self, "blur_sigma", _range("blur_sigma", self.blur_sigma, upper=math.inf))
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        for name in ("hflip", "vflip", "jitter_p", "grayscale_p"):
            _probability(name, getattr(self, name))
        for name in ("blur_p", "solarize_p"):
            value = tuple(_probability(name, v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} takes 3 probabilities (global 1, global 2, locals), got {value}")
            object.__setattr__(self, name, value)
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")

    @property
    def num_views(self) -> int:
        return self.global_views + self.local_views


@dataclass(frozen=True, kw_only=True)
class ColourParams:
    """One view's colour augmentation, drawn once and applied to every region.

    jitter: apply colour jitter; order: the order of (0 brightness, 1 contrast,
    2 saturation, 3 hue); brightness/contrast/saturation: multiplicative factors;
    hue: shift in turns (−0.5..0.5); grayscale; blur_sigma: px, 0 = no blur; solarize.
    """

    jitter: bool = False
    order: tuple[int, ...] = (0, 1, 2, 3)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False


@dataclass(frozen=True, kw_only=True)
class View:
    """One view of a slide.

    kind: "global" or "local".
    indices: (k,) long, rows of the sample's `regions` in the view's row-major order
        (after the flips' coord remap).
    coords: (k, 2) long, the remapped (row, col) grid coords, row-major sorted.
    window: (top, left, height, width) on the grid (the bounding box for "fallback").
    hflip / vflip: flip every region's columns / rows (applied on the device).
    path: "direct", "relaxed" or "fallback" (which stage of the crop algorithm found it).
    trials: crop tries used (2·trials for "fallback").
    colour: the view's colour parameters.
    """

    kind: str
    indices: Tensor
    coords: Tensor
    window: tuple[int, int, int, int]
    hflip: bool
    vflip: bool
    path: str
    trials: int
    colour: ColourParams = field(default_factory=ColourParams)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def _occupancy_table(coords: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Summed-area table of region counts per grid cell over the bounding box.

    Returns table (H + 1, W + 1) int64 with table[i, j] = regions in box rows < i, cols < j,
    and the box (top, left, H, W).
    """
    top, left = (int(v) for v in coords.min(dim=0).values)
    bottom, right = (int(v) for v in coords.max(dim=0).values)
    height, width = bottom - top + 1, right - left + 1
    grid = torch.zeros((height, width), dtype=torch.int64)
    ones = torch.ones(len(coords), dtype=torch.int64)
    grid.index_put_((coords[:, 0] - top, coords[:, 1] - left), ones, accumulate=True)
    table = torch.zeros((height + 1, width + 1), dtype=torch.int64)
    table[1:, 1:] = grid.cumsum(0).cumsum(1)
    return table, (top, left, height, width)


def _try_windows(
    table: Tensor,
    box: tuple[int, int, int, int],
    n: int,
    scale: tuple[float, float],
    count_range: tuple[float, float],
    trials: int,
    generator: torch.Generator,
) -> tuple[tuple[int, int, int, int], int] | None:
    """`trials` random windows at once; the first accepted (window in grid coords, tries used) or None."""
    _, _, height, width = box
    u = torch.rand((trials, 4), generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = torch.log(area / height**2), torch.log(width**2 / area)
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])  # w / h
    h = torch.sqrt(area / ratio).round().clamp(1, height).long()
    w = torch.sqrt(area * ratio).round().clamp(1, width).long()
    top = (u[:, 2] * (height - h + 1)).floor().long().clamp(max=height - h)
    left = (u[:, 3] * (width - w + 1)).floor().long().clamp(max=width - w)
    count = table[top + h, left + w] - table[top, left + w] - table[top + h, left] + table[top, left]
    fraction = count.double() / n
    ok = (count > 0) & (fraction >= count_range[0] - 1e-9) & (fraction <= count_range[1] + 1e-9)
    if not bool(ok.any()):
        return None
    i = int(ok.long().argmax())
    window = (box[0] + int(top[i]), box[1] + int(left[i]), int(h[i]), int(w[i]))
    return window, i + 1


def crop_view(
    coords: Tensor, *, kind: str, config: ViewConfig, generator: torch.Generator
) -> tuple[Tensor, tuple[int, int, int, int], str, int]:
    """The crop algorithm for one view (module docstring).

    coords: (n, 2) int (row, col) of the slide's foreground regions, n >= 1.
    Returns (indices (k,) long ascending — rows of `coords` inside the window,
    window (top, left, height, width), path, trials used).
    """
    if kind not in ("global", "local"):
        raise ValueError(f"view kind must be 'global' or 'local', got {kind!r}")
    coords = _check_coords(coords)
    return _crop(coords, _occupancy_table(coords), kind=kind, config=config, generator=generator)


def _check_coords(coords: Tensor) -> Tensor:
    coords = torch.as_tensor(coords).long().cpu()
    if coords.dim() != 2 or coords.shape[1] != 2 or coords.shape[0] < 1:
        raise ValueError(f"coords must have shape (n >= 1, 2), got {tuple(coords.shape)}")
    return coords


def _crop(
    coords: Tensor,
    table_box: tuple[Tensor, tuple[int, int, int, int]],
    *,
    kind: str,
    config: ViewConfig,
    generator: torch.Generator,
) -> tuple[Tensor, tuple[int, int, int, int], str, int]:
    """`crop_view` with the slide's summed-area table computed once for all its views."""
    n = coords.shape[0]
    table, box = table_box
    scale = config.global_scale if kind == "global" else config.local_scale
    relaxed = config.global_scale if kind == "global" else config.relaxed_local_scale
    for path, window_scale in (("direct", scale), ("relaxed", relaxed)):
        found = _try_windows(table, box, n, window_scale, scale, config.trials, generator)
        if found is not None:
            window, used = found
            top, left, h, w = window
            inside = (
                (coords[:, 0] >= top) & (coords[:, 0] < top + h) & (coords[:, 1] >= left) & (coords[:, 1] < left + w)
            )
            return inside.nonzero().flatten(), window, path, used + (config.trials if path == "relaxed" else 0)
    return torch.arange(n), box, "fallback", 2 * config.trials


def flip_view(
    indices: Tensor, coords: Tensor, window: tuple[int, int, int, int], *, hflip: bool, vflip: bool
) -> tuple[Tensor, Tensor]:
    """Remap a view's coords for its flips inside `window` and re-sort row-major.

    indices: (k,) long rows of the slide; coords: (n, 2) the slide's coords.
    Returns (indices (k,) in row-major order of the remapped coords, remapped coords (k, 2)).
    """
    top, left, height, width = window
    view = torch.as_tensor(coords).long().cpu()[indices].clone()
    if hflip:
        view[:, 1] = 2 * left + width - 1 - view[:, 1]
    if vflip:
        view[:, 0] = 2 * top + height - 1 - view[:, 0]
    key = (view[:, 0] - view[:, 0].min()) * (int(view[:, 1].max() - view[:, 1].min()) + 1) + (
        view[:, 1] - view[:, 1].min()
    )
    order = torch.argsort(key, stable=True)
    return indices[order], view[order]


def draw_colour(config: ViewConfig, position: int, generator: torch.Generator) -> ColourParams:
    """One view's colour parameters; `position` 0 = global 1, 1 = global 2, >= global_views = local.

    Always consumes the same amount of generator output (9 uniforms + a permutation of 4).
    """
    slot = min(position, 1) if position < config.global_views else 2
    u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()
    order = tuple(int(i) for i in torch.randperm(4, generator=generator))
    blur_lo, blur_hi = config.blur_sigma
    return ColourParams(
        jitter=u[0] < config.jitter_p,
        order=order,
        brightness=1.0 + config.brightness * (2.0 * u[1] - 1.0),
        contrast=1.0 + config.contrast * (2.0 * u[2] - 1.0),
        saturation=1.0 + config.saturation * (2.0 * u[3] - 1.0),
        hue=config.hue * (2.0 * u[4] - 1.0),
        grayscale=u[5] < config.grayscale_p,
        blur_sigma=blur_lo + (blur_hi - blur_lo) * u[7] if u[6] < config.blur_p[slot] else 0.0,
        solarize=u[8] < config.solarize_p[slot],
    )


def make_views(coords: Tensor, *, config: ViewConfig, generator: torch.Generator) -> list[View]:
    """All views of a slide: `global_views` global then `local_views` local ones.

    Per view, in this order: crop draws, two flip draws, colour draws — all from
    `generator`, so the views are a function of the generator's seed.
    """
    coords = _check_coords(coords)
    table_box = _occupancy_table(coords)
    views = []
    for position in range(config.num_views):
        kind = "global" if position < config.global_views else "local"
        indices, window, path, trials = _crop(coords, table_box, kind=kind, config=config, generator=generator)
        flips = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        hflip, vflip = flips[0] < config.hflip, flips[1] < config.vflip
        indices, view_coords = flip_view(indices, coords, window, hflip=hflip, vflip=vflip)
        views.append(
            View(
                kind=kind, indices=indices, coords=view_coords, window=window, hflip=hflip, vflip=vflip,
                path=path, trials=trials, colour=draw_colour(config, position, generator),
            )  # fmt: skip
        )
    return views


@dataclass(frozen=True, kw_only=True)
class MultiCropPreparer:
    """The loader-side step of DINO: `prepare(sample, generator)` adds `sample["views"]`.

    The sample is what `TileStoreDataset` yields (after the engine's region cap);
    `regions`/`coords` are left whole: `views[v].indices` index them. Picklable.
    """

    config: ViewConfig = field(default_factory=ViewConfig)

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        coords = sample.get("coords")
        if coords is None or len(coords) == 0:
            raise ValueError(f"slide {sample.get('slide_id')!r} has no regions to make views of")
        return {**sample, "views": make_views(coords, config=self.config, generator=generator)}
