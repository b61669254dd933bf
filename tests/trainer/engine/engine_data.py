"""In-memory slides for the engine tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import torch

from trainer.objectives.base import HookContext, Objective, make_teacher
from trainer.schedules import CosineSchedule


class ColourSlides(torch.utils.data.Dataset):
    """In-memory two-class slides for engine tests: (4, size, size, 3) uint8 noise, class = dominant colour.

    Sample keys as `TileStoreDataset`'s; label = index % 2; slide_id "s<index>".
    """

    def __init__(self, n: int, *, size: int = 16, regions: int = 4, offset: int = 0) -> None:
        self.n, self.size, self.regions, self.offset = n, size, regions, offset
        self.labels = np.arange(n) % 2
        self.label_map = {"a": 0, "b": 1}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(self.offset + index)
        pixels = rng.integers(0, 120, size=(self.regions, self.size, self.size, 3))
        pixels[..., 0 if index % 2 == 0 else 2] += 120
        return {
            "regions": torch.from_numpy(pixels.astype(np.uint8)),
            "coords": torch.zeros((self.regions, 2), dtype=torch.int64),
            "label": torch.tensor(index % 2),
            "slide_id": f"s{self.offset + index}",
            "index": index,
        }



class GridSlides(torch.utils.data.Dataset):
    """Slides with distinct per-region pixels on a grid of coords (for region-cap and prepare tests).

    Slide i has 6 + i regions; region k's pixels are all (i * 7 + k) % 256.
    """

    def __init__(self, n: int, *, size: int = 4) -> None:
        self.n, self.size = n, size
        self.labels = np.zeros(n, dtype=np.int64)
        self.label_map = {"a": 0}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        count = 6 + index
        values = (index * 7 + np.arange(count)) % 256
        pixels = np.broadcast_to(values[:, None, None, None], (count, self.size, self.size, 3)).astype(np.uint8)
        coords = np.stack([np.arange(count) // 4, np.arange(count) % 4], axis=1)
        return {
            "regions": torch.from_numpy(pixels.copy()),
            "coords": torch.from_numpy(coords.astype(np.int64)),
            "label": torch.tensor(0),
            "slide_id": f"g{index}",
            "index": index,
        }


class RandomMask:
    """A picklable preparer: a random half of the regions become "visible" (index work only)."""

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        n = sample["regions"].shape[0]
        order = torch.randperm(n, generator=generator)
        return {**sample, "visible": order[: max(1, n // 2)].sort().values}


class ParamObjective(Objective):
    """A one-tensor objective for engine mechanics: loss = f(w) chosen by `kind`.

    kind "quadratic": finite loss and gradient; "inf_grad": loss sqrt(|w|) at w = 0
    (finite loss, infinite gradient); "overflow": finite loss whose gradient overflows
    fp32 once a GradScaler scales it.
    """

    name = "param_test"
    requires_labels = False

    def __init__(self, kind: str = "quadratic", *, teacher: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.encoder = torch.nn.Linear(2, 2)
        if kind == "inf_grad":
            torch.nn.init.zeros_(self.encoder.weight)
        if kind == "overflow":
            torch.nn.init.constant_(self.encoder.weight, 1e-36)
        self.teacher = make_teacher(self.encoder) if teacher else None
        self.after: list[HookContext] = []

    def ema_pairs(self):
        return [(self.teacher, self.encoder)] if self.teacher is not None else []

    def schedules(self, plan):
        if self.teacher is None:
            return {}
        return {"ema_momentum": CosineSchedule(base=0.5, final=0.9, total_steps=plan.total_steps)}

    def forward(self, sample, *, step_ctx):
        w = self.encoder.weight
        x = sample["regions"].float().mean() / 255.0
        if self.kind == "inf_grad":
            loss = w.abs().sqrt().sum() + x
        elif self.kind == "overflow":
            loss = (w * 1e35).sum() * (1 + x)
        else:
            loss = ((w - x) ** 2).sum() + self.encoder.bias.pow(2).sum()
        return {"loss": loss}

    def on_after_step(self, ctx) -> None:
        self.after.append(ctx)
