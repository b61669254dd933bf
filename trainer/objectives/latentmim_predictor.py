"""LatentMIM's predictor: a cross-attention decoder from visible tokens to target-token queries.

    keys   = Linear(enc → W)(visible tokens) + w_pos · sincos(visible positions)      (Nv, W)
    queries = mask_token + sincos(target spatial positions)   (zero-initialised, shared)
            | cls_token  + sincos(target region centres)      (random init, shared)    (Nq, W)
    depth × [ q += SA(LN q);  q += CA(LN q, LN keys);  q += MLP(LN q) ]                 (pre-norm)
    predictions = Linear(W → enc)(LN q)                                                 (Nq, enc)

Positional embeddings are 2-D sine-cosine at the predictor's width, added after the
input projection (DESIGN.md §9); positions come from `trainer.models.positions`.
`w_pos` (`visible_pos_weight`, 1.0 in the thesis) down-weights the keys' positional
embedding — one of the thesis's proposed remedies for a predictor that leans on
positions rather than content. One slide per call (no batch dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from trainer.models.positions import sincos_embedding_2d


@dataclass(frozen=True, kw_only=True)
class PredictorConfig:
    """Predictor sizes (LatentMIM's defaults: 3 blocks, width 512, 16 heads, MLP ratio 4).

    visible_pos_weight: scale of the positional embedding added to the visible tokens
      (1.0 = the thesis; < 1 down-weights positions in the predictor input).
    """

    width: int = 512
    depth: int = 3
    heads: int = 16
    mlp_ratio: float = 4.0
    visible_pos_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.width < 4 or self.width % 4:
            raise ValueError(f"predictor width must be a positive multiple of 4 (2-D sin-cos), got {self.width}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"predictor width {self.width} must be divisible by heads ({self.heads})")
        if self.depth < 1:
            raise ValueError(f"predictor depth must be >= 1, got {self.depth}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"predictor mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.visible_pos_weight < 0:
            raise ValueError(f"visible_pos_weight must be >= 0, got {self.visible_pos_weight}")


class PredictorOutput(NamedTuple):
    """predictions (Nq, enc); hidden: the final normed queries (Nq, W); query_pos: their sin-cos (Nq, W)."""

    predictions: Tensor
    hidden: Tensor
    query_pos: Tensor


class CrossAttentionBlock(nn.Module):
    """Pre-norm decoder block: self-attention over queries, cross-attention to keys, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_query = nn.LayerNorm(width)
        self.norm_keys = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        """queries (1, Nq, W), keys (1, Nv, W) → queries (1, Nq, W)."""
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        k = self.norm_keys(keys)
        queries = queries + self.cross_attn(self.norm_query(queries), k, k, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class LatentMIMPredictor(nn.Module):
    """Predicts the teacher's target tokens from the student's visible tokens and the targets' positions.

    embed_dim: encoder width (input and output); spatial_queries: build the mask
    token (False when only CLS tokens are predicted, so no parameter goes unused).
    """

    def __init__(self, config: PredictorConfig, *, embed_dim: int, spatial_queries: bool = True) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.input_proj = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width)) if spatial_queries else None
        self.cls_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # the mask token stays zero (LatentMIM)

    def forward(self, visible: Tensor, visible_pos: Tensor, query_pos: Tensor, query_is_cls: Tensor) -> PredictorOutput:
        """visible (Nv, enc), visible_pos (Nv, 2), query_pos (Nq, 2), query_is_cls (Nq,) bool → PredictorOutput."""
        if visible.dim() != 2 or visible_pos.shape != (visible.shape[0], 2):
            raise ValueError(
                f"visible tokens (Nv, C) and positions (Nv, 2) expected, got {tuple(visible.shape)} and "
                f"{tuple(visible_pos.shape)}"
            )
        if query_pos.dim() != 2 or query_pos.shape[1] != 2 or query_is_cls.shape != (query_pos.shape[0],):
            raise ValueError(
                f"query positions (Nq, 2) and flags (Nq,) expected, got {tuple(query_pos.shape)} and "
                f"{tuple(query_is_cls.shape)}"
            )
        width = self.config.width
        keys = self.input_proj(visible)
        keys = keys + self.config.visible_pos_weight * sincos_embedding_2d(visible_pos, width).to(keys.dtype)
        pos = sincos_embedding_2d(query_pos, width)
        if self.mask_token is None:
            if not bool(query_is_cls.all()):
                raise ValueError("this predictor was built for CLS queries only (spatial_queries=False)")
            base = self.cls_token.expand(query_pos.shape[0], -1)
        else:
            base = torch.where(query_is_cls[:, None], self.cls_token, self.mask_token)
        queries = (base + pos.to(base.dtype))[None]
        keys = keys[None]
        for block in self.blocks:
            queries = block(queries, keys)
        hidden = self.norm(queries)[0]
        return PredictorOutput(predictions=self.output_proj(hidden), hidden=hidden, query_pos=pos)
