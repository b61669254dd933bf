"""Pixel-Mamba: a slide encoder over raw pixels (thesis §3.1, table A.1; DESIGN.md §9).

One slide = one sample: ``regions (n, R, R, 3) uint8`` in the tile store's
row-major grid order. Every region starts as an R×R grid of 1×1-pixel tokens
with 3 channels plus one shared learnable CLS token. Each layer is

    Mamba block (whole slide as ONE sequence) → Region Fusion → Token Expansion (optional)

and after the last layer a final RMSNorm; the mean of the surviving regions' CLS
tokens is the slide embedding, optionally followed by a linear head.
Tokens stay a per-region grid ``(n, h, w, C)`` + ``(n, C)`` CLS between blocks
and are flattened (:mod:`trainer.models.serialization`) only for the Mamba call.

Several views in one call (``segments``, one view index per region): views with
equal region counts run as a real batch (B = #views); unequal ones are packed
into one sequence whose ``seq_idx`` keeps conv and scan from crossing views.
Region Fusion and drop path act per view, so each view's output is what a call
on that view alone returns (to float tolerance; see ``PixelMamba.forward``).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.models.mamba_block import MambaBlockConfig, ResidualMambaBlock, no_weight_decay
from trainer.models.region_fusion import RegionFusion, fuse_views
from trainer.models.serialization import deserialize, serialize
from trainer.models.ssm import BACKENDS, supports_seq_idx
from trainer.models.token_expansion import TokenExpansion

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One Pixel-Mamba layer: the Token Expansion after its Mamba block + Region Fusion.

    expansion: None (no TE), "h" (merge column pairs) or "v" (merge row pairs);
    merge: "cat" (channels ×2) or "avg" (channels unchanged); ignored when expansion is None.
    """

    expansion: Literal["h", "v"] | None = None
    merge: Literal["cat", "avg"] = "cat"

    def __post_init__(self) -> None:
        if self.expansion not in (None, "h", "v"):
            raise ValueError(f"LayerSpec.expansion must be None, 'h' or 'v', got {self.expansion!r}")
        if self.merge not in ("cat", "avg"):
            raise ValueError(f"LayerSpec.merge must be 'cat' or 'avg', got {self.merge!r}")

    @property
    def label(self) -> str:
        """Table A.1 notation: '-' or e.g. 'H-Cat'."""
        return "-" if self.expansion is None else f"{self.expansion.upper()}-{self.merge.capitalize()}"


def parse_schedule(entries: tuple[str, ...] | list[str]) -> tuple[LayerSpec, ...]:
    """Layer specs from table A.1 notation: '-', 'H-Cat', 'V-Cat', 'H-Avg', 'V-Avg'."""
    specs = []
    for i, entry in enumerate(entries):
        text = entry.strip().lower()
        if text == "-":
            specs.append(LayerSpec())
            continue
        direction, _, merge = text.partition("-")
        if direction not in ("h", "v") or merge not in ("cat", "avg"):
            raise ValueError(
                f"layer {i + 1}: bad schedule entry {entry!r}; use '-', 'H-Cat', 'V-Cat', 'H-Avg' or 'V-Avg'"
            )
        specs.append(LayerSpec(expansion=direction, merge=merge))  # type: ignore[arg-type]
    return tuple(specs)


# Table A.1 of the thesis: the Token Expansion after each of the 24 layers.
PIXEL_MAMBA_6M_SCHEDULE = (
    "H-Cat", "V-Cat", "H-Cat", "V-Cat", "-", "H-Cat", "-", "V-Cat", "-", "-", "H-Avg", "-",
    "-", "V-Avg", "-", "-", "-", "-", "-", "H-Avg", "-", "V-Cat", "-", "-",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PixelMambaConfig:
    """Everything that defines a Pixel-Mamba network.

    region_size: R, pixels per region side at the store's MPP; must be divisible by
      2^(#horizontal TEs) and 2^(#vertical TEs).
    layers: per-layer specs (see :class:`LayerSpec`); len(layers) = L, the network depth.
    in_chans: input channels (RGB = 3); also the CLS token's width at input.
    d_state, expand, d_conv, dt_rank: Mamba block sizes (dt_rank None → ceil(d/16) per layer).
    drop_path_rate: drop-path probability rises linearly 0 → this over the layers.
    region_fusion, fusion_alpha: Region Fusion on/off and its severity α.
    ssm_backend: selective-scan backend name passed to ``trainer.models.ssm`` ("auto", "torch", ...).
    checkpoint_layers: activation-checkpoint the Mamba blocks of the first k layers.
    num_classes: linear head size; 0 = no head (``logits`` is None).
    pixel_mean, pixel_std: per-channel input normalisation of x/255 (ImageNet by default).
    norm_eps: RMSNorm epsilon.
    """

    region_size: int = 224
    layers: tuple[LayerSpec, ...] = field(default_factory=lambda: parse_schedule(PIXEL_MAMBA_6M_SCHEDULE))
    in_chans: int = 3
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None
    drop_path_rate: float = 0.1
    region_fusion: bool = True
    fusion_alpha: float = 0.8
    ssm_backend: str = "auto"
    checkpoint_layers: int = 0
    num_classes: int = 0
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or not all(isinstance(s, LayerSpec) for s in self.layers):
            raise ValueError("PixelMambaConfig.layers must be a non-empty tuple of LayerSpec")
        if self.region_size < 1 or self.in_chans < 1:
            raise ValueError(f"region_size and in_chans must be ≥ 1, got {self.region_size}, {self.in_chans}")
        rows, cols = self.final_token_size
        if self.region_size % rows or self.region_size % cols:
            raise ValueError(
                f"region_size {self.region_size} is not divisible by the token size the schedule reaches "
                f"({rows}×{cols} px after {self.layers_label().count('V-')} vertical and "
                f"{self.layers_label().count('H-')} horizontal Token Expansions)"
            )
        if self.ssm_backend not in BACKENDS:
            raise ValueError(f"unknown ssm_backend {self.ssm_backend!r}; choose one of {BACKENDS}")
        if not 0 <= self.checkpoint_layers <= len(self.layers):
            raise ValueError(f"checkpoint_layers must be in [0, {len(self.layers)}], got {self.checkpoint_layers}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be ≥ 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 < self.fusion_alpha <= 1.0:
            raise ValueError(f"fusion_alpha must be in (0, 1], got {self.fusion_alpha}")
        if len(self.pixel_mean) != self.in_chans or len(self.pixel_std) != self.in_chans:
            raise ValueError(f"pixel_mean and pixel_std need {self.in_chans} values each")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_std must be positive, got {self.pixel_std}")

    def layers_label(self) -> str:
        return ", ".join(spec.label for spec in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_token_sizes(self) -> list[tuple[int, int]]:
        """Pixels per token (rows, cols) entering each layer; table A.1's 'Token Size'."""
        sizes, rows, cols = [], 1, 1
        for spec in self.layers:
            sizes.append((rows, cols))
            rows, cols = rows * (2 if spec.expansion == "v" else 1), cols * (2 if spec.expansion == "h" else 1)
        return sizes

    def layer_channels(self) -> list[int]:
        """Token width entering each layer = the width its Mamba block runs at; table A.1's 'Channels'."""
        widths, c = [], self.in_chans
        for spec in self.layers:
            widths.append(c)
            if spec.expansion is not None and spec.merge == "cat":
                c *= 2
        return widths

    @property
    def final_token_size(self) -> tuple[int, int]:
        """Pixels per token (rows, cols) after the last layer."""
        rows = 2 ** sum(s.expansion == "v" for s in self.layers)
        cols = 2 ** sum(s.expansion == "h" for s in self.layers)
        return rows, cols

    @property
    def final_grid(self) -> tuple[int, int]:
        """Spatial tokens per region (h, w) after the last layer, e.g. (7, 7) for R = 224 in 6m."""
        rows, cols = self.final_token_size
        return self.region_size // rows, self.region_size // cols

    @property
    def embed_dim(self) -> int:
        """Width of the output tokens."""
        c = self.layer_channels()[-1]
        last = self.layers[-1]
        return 2 * c if last.expansion is not None and last.merge == "cat" else c


@dataclass(frozen=True)
class PixelMambaOutput:
    """What the network returns for one slide of n regions, m ≤ n surviving Region Fusion.

    cls_tokens: (m, C) survivors' CLS tokens after the final norm;
    spatial_tokens: (m, h, w, C) after the final norm;
    region_ids: (m,) long, each survivor's representative original region index;
    assignment: (n,) long, per input region the survivor index it ended in;
    embedding: (C,) mean of cls_tokens;
    logits: (num_classes,) or None when the config has no head.
    """

    cls_tokens: Tensor
    spatial_tokens: Tensor
    region_ids: Tensor
    assignment: Tensor
    embedding: Tensor
    logits: Tensor | None


class PixelMambaLayer(nn.Module):
    """Mamba block → Region Fusion → optional Token Expansion (one row of table A.1)."""

    def __init__(self, *, block: MambaBlockConfig, spec: LayerSpec, fusion_alpha: float, num_layers: int) -> None:
        super().__init__()
        self.block = ResidualMambaBlock(block)
        self.fusion = RegionFusion(alpha=fusion_alpha, num_layers=num_layers)
        self.expansion = (
            TokenExpansion(direction=spec.expansion, merge=spec.merge) if spec.expansion is not None else None
        )


Generators = torch.Generator | list[torch.Generator] | tuple[torch.Generator, ...] | None


def _mamba_step(
    block: ResidualMambaBlock, spatial: Tensor, cls: Tensor, keep_scale: Tensor | None, *, counts: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Run one block over every view, each view's regions as one sequence.

    spatial (n, h, w, C), cls (n, C): the views' regions back to back, view v has counts[v];
    keep_scale: (#views,) drop-path factors or None. Equal counts run as a batch of
    #views sequences; otherwise all views are packed into one sequence with seq_idx.
    """
    n, h, w, c = spatial.shape
    seq = serialize(spatial, cls)  # (1, n·tokens, C): the views' sequences back to back
    tokens = h * w + 1
    views = len(counts)
    if all(k == counts[0] for k in counts):
        out = block(seq.reshape(views, counts[0] * tokens, c), keep_scale)
        return deserialize(out.reshape(1, n * tokens, c), n, h, w)
    lengths = torch.tensor(counts, device=spatial.device) * tokens
    seq_idx = torch.repeat_interleave(
        torch.arange(views, dtype=torch.int32, device=spatial.device), lengths, output_size=n * tokens
    )[None]
    keep_tokens = None
    if keep_scale is not None:
        keep_tokens = torch.repeat_interleave(keep_scale, lengths, output_size=n * tokens)[None]
    return deserialize(block(seq, keep_tokens, seq_idx=seq_idx), n, h, w)


def view_counts(segments: Tensor, n: int) -> list[int]:
    """Regions per view from ``segments`` (n,) — nondecreasing, 0..S−1, every view present. Raises ValueError."""
    if not isinstance(segments, Tensor) or segments.dim() != 1 or segments.shape[0] != n:
        shape = tuple(segments.shape) if isinstance(segments, Tensor) else type(segments).__name__
        raise ValueError(f"segments must be a ({n},) tensor, one view index per region, got {shape}")
    if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
        raise ValueError(f"segments must be an integer (long) tensor, got {segments.dtype}")
    values = segments.tolist()
    if values[0] != 0 or any(b - a not in (0, 1) for a, b in zip(values, values[1:])):
        raise ValueError(
            "segments must start at 0 and step by 0 or 1 (views 0..S−1, each a contiguous block of regions, "
            f"none empty), got {values[:20]}{' ...' if n > 20 else ''}"
        )
    counts = [0] * (values[-1] + 1)
    for v in values:
        counts[v] += 1
    return counts


def _view_generators(generator: Generators, views: int) -> list[torch.Generator | None]:
    """One generator per view: a list is taken as given (length = #views), one generator (or None) is shared."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != views:
            raise ValueError(f"got {len(generator)} generators for {views} view(s); pass one per view or a single one")
        return list(generator)
    return [generator] * views


class PixelMamba(nn.Module):
    """The Pixel-Mamba network; ``forward(regions, generator=...) → PixelMambaOutput`` (a list of them with ``segments``)."""

    def __init__(self, config: PixelMambaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        L = config.num_layers
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std, dtype=torch.float32), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(config.in_chans))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        no_weight_decay(self.cls_token)

        drop_rates = torch.linspace(0.0, config.drop_path_rate, L).tolist() if L > 1 else [0.0]
        self.layers = nn.ModuleList()
        for spec, width, rate in zip(config.layers, config.layer_channels(), drop_rates):
            block = MambaBlockConfig(
                d_model=width,
                d_state=config.d_state,
                expand=config.expand,
                d_conv=config.d_conv,
                dt_rank=config.dt_rank,
                norm_eps=config.norm_eps,
                drop_path=rate,
                ssm_backend=config.ssm_backend,
            )
            self.layers.append(PixelMambaLayer(block=block, spec=spec, fusion_alpha=config.fusion_alpha, num_layers=L))
        self.norm = nn.RMSNorm(self.embed_dim, eps=config.norm_eps)
        no_weight_decay(self.norm.weight)
        self.head = nn.Linear(self.embed_dim, config.num_classes) if config.num_classes > 0 else None
        self._init_weights()

    def _init_weights(self) -> None:
        # Mamba's pre-norm residual rescaling: out_proj ~ kaiming-uniform / sqrt(depth).
        with torch.no_grad():
            for layer in self.layers:
                layer.block.mixer.out_proj.weight.div_(math.sqrt(self.config.num_layers))
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            no_weight_decay(self.head.bias)

    def _stem(self, regions: Tensor) -> Tensor:
        """regions (n, R, R, in_chans) uint8 (or float in [0, 1]) → normalised float32, same shape."""
        cfg = self.config
        if not isinstance(regions, Tensor):
            raise TypeError(f"regions must be a torch.Tensor, got {type(regions).__name__}")
        expected = (cfg.region_size, cfg.region_size, cfg.in_chans)
        if regions.dim() != 4 or tuple(regions.shape[1:]) != expected or regions.shape[0] < 1:
            raise ValueError(
                f"regions must have shape (n ≥ 1, {', '.join(map(str, expected))}) for this model "
                f"(region_size={cfg.region_size}), got {tuple(regions.shape)}"
            )
        if regions.device != self.cls_token.device:
            raise ValueError(f"regions are on {regions.device} but the model is on {self.cls_token.device}")
        if regions.dtype == torch.uint8:
            x = regions.float() / 255.0
        elif regions.is_floating_point():
            x = regions.float()
        else:
            raise TypeError(f"regions must be uint8 (or float scaled to [0, 1]), got {regions.dtype}")
        return (x - self.pixel_mean) / self.pixel_std

    def forward(
        self,
        regions: Tensor,
        *,
        generator: Generators = None,
        region_fusion: bool | None = None,
        random_split: bool | None = None,
        segments: Tensor | None = None,
    ) -> PixelMambaOutput | list[PixelMambaOutput]:
        """Encode one slide, or several views at once (``segments``).

        regions: (n, R, R, in_chans) uint8 on the model's device (float input is
          taken as already scaled to [0, 1], e.g. after on-device colour augmentation).
        generator: source of the randomness — drop path (training mode) and random
          gallery/probe splits; None = the global RNG. Per layer, each view draws its
          drop-path factor (one ``torch.rand(1)``, if the layer's rate is > 0), then its
          split (one ``torch.randperm(n_v)``, if the layer fuses): the same draws, in the
          same order, as a call on that view alone. With a list [g_0, ..., g_{S−1}] view v
          draws from g_v only, so a packed call equals separate calls with g_v. A single
          generator (or None) is shared: the draws go layer by layer, views in order
          within a layer, so they differ from back-to-back separate calls.
        region_fusion: override of ``config.region_fusion`` for this call (None = config).
        random_split: Region Fusion's split — True random, False alternating, None =
          ``self.training`` (teachers pass it explicitly).
        segments: (n,) long view index per region, nondecreasing, 0..S−1, each view
          contiguous, or None (one slide). With segments the result is a list of S
          outputs, output v being what ``forward(regions[segments == v], generator=g_v)``
          returns (to float tolerance; region ids and assignment local to the view, one
          embedding and logits per view). Views of equal region count run as one batch;
          otherwise they are packed into one sequence with ``seq_idx`` (conv, scan), or,
          where the scan backend cannot pack (mamba-ssm), run one after another.

        Returns a :class:`PixelMambaOutput` (segments None) or a list of S of them.
        """
        x = self._stem(regions)
        n = x.shape[0]
        counts = [n] if segments is None else view_counts(segments, n)
        generators = _view_generators(generator, len(counts))
        fuse = self.config.region_fusion if region_fusion is None else region_fusion
        random = self.training if random_split is None else random_split
        if len(set(counts)) > 1 and not supports_seq_idx(self.config.ssm_backend, x.device):
            starts = [0] + list(itertools.accumulate(counts))
            outputs = [
                self._encode(x[s:e], [e - s], [g], fuse=fuse, random=random)[0]
                for s, e, g in zip(starts, starts[1:], generators)
            ]
        else:
            outputs = self._encode(x, counts, generators, fuse=fuse, random=random)
        return outputs if segments is not None else outputs[0]

    def _encode(
        self, x: Tensor, counts: list[int], generators: list[torch.Generator | None], *, fuse: bool, random: bool
    ) -> list[PixelMambaOutput]:
        """x (Σn_v, R, R, C) normalised pixels, view v's counts[v] regions contiguous → one output per view."""
        device = x.device
        spatial = x
        cls = self.cls_token.float().expand(x.shape[0], -1)
        region_ids = [torch.arange(k, device=device) for k in counts]
        assignment = [torch.arange(k, device=device) for k in counts]

        for i, layer in enumerate(self.layers):
            keep = None
            if self.training and layer.block.cfg.drop_path > 0.0:
                draws = [layer.block.draw_keep_scale(1, generator=g, device=device) for g in generators]
                keep = draws[0] if len(draws) == 1 else torch.cat(draws)
            step = functools.partial(_mamba_step, layer.block, counts=tuple(counts))
            if i < self.config.checkpoint_layers and torch.is_grad_enabled():
                spatial, cls = checkpoint(step, spatial, cls, keep, use_reentrant=False)
            else:
                spatial, cls = step(spatial, cls, keep)
            if fuse:
                spatial, cls, counts, region_ids, assignment = fuse_views(
                    layer.fusion, spatial, cls, counts=counts, region_ids=region_ids,
                    assignment=assignment, random=random, generators=generators,
                )  # fmt: skip
            if layer.expansion is not None:
                spatial, cls = layer.expansion(spatial, cls)

        spatial = self.norm(spatial)
        cls = self.norm(cls)
        outputs = []
        for cls_v, spatial_v, ids_v, asg_v in zip(cls.split(counts), spatial.split(counts), region_ids, assignment):
            embedding = cls_v.mean(dim=0)
            outputs.append(
                PixelMambaOutput(
                    cls_tokens=cls_v,
                    spatial_tokens=spatial_v,
                    region_ids=ids_v,
                    assignment=asg_v,
                    embedding=embedding,
                    logits=self.head(embedding) if self.head is not None else None,
                )
            )
        return outputs
