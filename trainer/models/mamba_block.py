"""Bidirectional Mamba block (Vision Mamba "v2" layout) and its pre-norm residual wrapper.

``BidirectionalMamba`` (the mixer), for tokens ``x: (B, L, d)``:

- shared: ``in_proj`` d → 2·d_inner (no bias) giving (x, z); ``out_proj`` d_inner → d (no bias);
- per direction (``_f`` forward, ``_b`` backward): depthwise causal conv1d (kernel
  ``d_conv``, bias, SiLU), ``x_proj`` d_inner → dt_rank + 2·d_state (no bias),
  ``dt_proj`` dt_rank → d_inner (bias, used as the scan's ``delta_bias``), ``A_log``, ``D``;
- backward direction = the forward computation on the flipped sequence (x and z
  flipped), flipped back; output ``out_proj((y_f + y_b) / 2)``.

Packing: ``seq_idx: (B, L)`` integer marks which sequence each token belongs to;
conv taps and scan states never cross a change of seq_idx (flipped with the
sequence for the backward direction, so its resets fall on the same boundaries),
so every packed sequence is mixed exactly as if it were alone.

Scan inputs are cast to float32 and the conv + scan run with autocast off, as
mamba-ssm does; the projections follow the ambient autocast dtype.

Parameters that take no weight decay (``A_log``, ``D``, every bias and norm
weight) carry the attribute ``_no_weight_decay = True``; optimiser grouping
should look for it (``getattr(p, "_no_weight_decay", False)``).

``ResidualMambaBlock``: ``x + drop_path(mixer(RMSNorm(x)))`` with the residual
stream kept in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.models.ssm import causal_conv1d, selective_scan_fn

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Tag ``param`` so that the optimiser puts it in the no-weight-decay group."""
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


@dataclass(frozen=True, kw_only=True)
class MambaBlockConfig:
    """One bidirectional Mamba block at width ``d_model``.

    ``dt_rank=None`` → ``ceil(d_model / 16)``; ``d_inner = expand · d_model``.
    """

    d_model: int
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    ssm_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_state", "expand", "d_conv"):
            if getattr(self, name) < 1:
                raise ValueError(f"MambaBlockConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"MambaBlockConfig.dt_rank must be ≥ 1 or None, got {self.dt_rank}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"MambaBlockConfig.drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


class _Direction(nn.Module):
    """The per-direction half of the block: conv1d, x_proj, dt_proj, A_log, D."""

    def __init__(self, cfg: MambaBlockConfig) -> None:
        super().__init__()
        d_inner, dt_rank, d_state = cfg.d_inner, cfg.resolved_dt_rank, cfg.d_state
        self.dt_rank, self.d_state = dt_rank, d_state
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self._init_dt(dt_rank)
        for p in (self.A_log, self.D, self.conv1d.bias, self.dt_proj.bias):
            no_weight_decay(p)

    def _init_dt(self, dt_rank: int) -> None:
        bound = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        d_inner = self.dt_proj.out_features
        dt = torch.exp(torch.rand(d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        inv_softplus = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus)

    def forward(self, x: Tensor, z: Tensor, *, backend: str, seq_idx: Tensor | None = None) -> Tensor:
        """x, z: (B, d_inner, L) float32; seq_idx: (B, L) int32 or None → y: (B, d_inner, L) float32 (gated by silu(z))."""
        weight = self.conv1d.weight.squeeze(1).float()
        # The "cuda" scan backend uses causal-conv1d only if present (it is optional beside
        # mamba-ssm): "auto" picks it on CUDA when it imports, F.conv1d otherwise; so does "triton".
        conv_backend = "auto" if backend in ("cuda", "triton") else backend
        x = causal_conv1d(x, weight, self.conv1d.bias.float(), activation="silu", seq_idx=seq_idx, backend=conv_backend)
        # x_proj applied as three matmuls on the channels-first x: each result is already the
        # contiguous (B, ·, L) layout the scan takes, and no (B, L, dt_rank + 2N) tensor is kept.
        w_dt, w_b, w_c = torch.split(self.x_proj.weight.float(), [self.dt_rank, self.d_state, self.d_state], dim=0)
        delta = torch.matmul(self.dt_proj.weight.float(), torch.matmul(w_dt, x))  # (B, d_inner, L)
        return selective_scan_fn(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            torch.matmul(w_b, x),
            torch.matmul(w_c, x),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            seq_idx=seq_idx,
            backend=backend,
        )


class BidirectionalMamba(nn.Module):
    """Vim-v2 bidirectional Mamba mixer: (B, L, d) → (B, L, d)."""

    def __init__(self, cfg: MambaBlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner, bias=False)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)
        self.fwd = _Direction(cfg)
        self.bwd = _Direction(cfg)

    def forward(self, hidden: Tensor, *, seq_idx: Tensor | None = None) -> Tensor:
        """hidden: (B, L, d); seq_idx: (B, L) int32 or None (packing) → (B, L, d) in the ambient (autocast) dtype."""
        xz = self.in_proj(hidden)
        x, z = xz.float().transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        x, z = x.contiguous(), z.contiguous()
        backend = self.cfg.ssm_backend
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            y_f = self.fwd(x, z, backend=backend, seq_idx=seq_idx)
            seq_idx_b = None if seq_idx is None else seq_idx.flip(-1)
            y_b = self.bwd(x.flip(-1), z.flip(-1), backend=backend, seq_idx=seq_idx_b).flip(-1)
        y = ((y_f + y_b) / 2).transpose(1, 2)
        return self.out_proj(y.to(xz.dtype))


class ResidualMambaBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(mixer(RMSNorm(x)))``, residual in float32."""

    def __init__(self, cfg: MambaBlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        no_weight_decay(self.norm.weight)
        self.mixer = BidirectionalMamba(cfg)

    def forward(self, x: Tensor, keep_scale: Tensor | None = None, *, seq_idx: Tensor | None = None) -> Tensor:
        """x: (B, L, d) → (B, L, d) float32.

        keep_scale: drop-path factors — 0 (branch dropped) or 1/(1 − p) (kept) —
        drawn by the caller so a checkpointed recompute sees the same draw:
        (B,) one per sample, or (B, L) one per token (packed sequences: each
        token carries its own sequence's draw); None = no drop path.
        seq_idx: (B, L) int32 packing index for the mixer, or None.
        """
        residual = x.float()
        out = self.mixer(self.norm(residual), seq_idx=seq_idx).float()
        if keep_scale is not None:
            if keep_scale.dim() == 2:
                if tuple(keep_scale.shape) != tuple(out.shape[:2]):
                    raise ValueError(f"per-token keep_scale must be (B, L) = {tuple(out.shape[:2])}, got {tuple(keep_scale.shape)}")
                out = out * keep_scale.to(out.dtype).unsqueeze(-1)
            else:
                out = out * keep_scale.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return residual + out

    def draw_keep_scale(self, batch: int, *, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
        """Drop-path factors (batch,) for a training step, or None when this block's rate is 0."""
        p = self.cfg.drop_path
        if p == 0.0:
            return None
        gen_device = generator.device if generator is not None else device
        u = torch.rand(batch, generator=generator, device=gen_device).to(device)
        return (u >= p).float() / (1.0 - p)
