"""Training objectives: one module each, one interface (`trainer.objectives.base.Objective`).

`OBJECTIVES` is the registry the CLI wires: `pm-train <name>` exists for each entry.
Each objective module registers itself here by name with the dataclass config it
reads from its recipe section (`[<name>]` in the TOML) and a builder
`build(encoder, config, context) -> Objective`. `objective_cls` (optional) lets
the CLI read `requires_labels` before building; without it, an objective that
needs a head is taken to need labels and any other not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    """What a builder may need beyond the encoder: label map ({} for unlabelled SSL data),
    the store's region size (px) and MPP (µm/px, None for image folders)."""

    label_map: Mapping[str, int] = field(default_factory=dict)
    region_size: int = 224
    mpp: float | None = None


@dataclass(frozen=True, kw_only=True)
class ObjectiveSpec:
    """One registered objective: its config class, builder, and whether the encoder needs a head."""

    name: str
    config_cls: type
    build: Callable[[Any, Any, BuildContext], Any]
    summary: str
    needs_head: bool = False
    objective_cls: type | None = None  # lets the CLI read class-level facts (requires_labels) before building


def _build_supervised(encoder, config, context: BuildContext):
    from trainer.objectives.supervised import SupervisedObjective

    return SupervisedObjective(encoder, label_map=context.label_map, config=config)


def _supervised_spec() -> ObjectiveSpec:
    from trainer.objectives.supervised import SupervisedConfig, SupervisedObjective

    return ObjectiveSpec(
        name="supervised",
        config_cls=SupervisedConfig,
        build=_build_supervised,
        summary="Supervised slide classification (cross-entropy on slide labels; QWK/accuracy validation).",
        needs_head=True,
        objective_cls=SupervisedObjective,
    )


def _latentmim_spec() -> ObjectiveSpec:
    from trainer.objectives.latentmim import LatentMIMConfig, LatentMIMObjective

    return ObjectiveSpec(
        name="latentmim",
        config_cls=LatentMIMConfig,
        build=lambda encoder, config, context: LatentMIMObjective(encoder, config=config),
        objective_cls=LatentMIMObjective,
        summary="LatentMIM: predict the EMA teacher's masked-region tokens from the visible regions "
        "(patch-discrimination InfoNCE within a slide; thesis §3.2).",
    )


def _dino_spec() -> ObjectiveSpec:
    from trainer.objectives.dino import DinoConfig, DinoObjective

    return ObjectiveSpec(
        name="dino",
        config_cls=DinoConfig,
        build=lambda encoder, config, context: DinoObjective(encoder, config=config),
        objective_cls=DinoObjective,
        summary="DINO self-distillation over 2 global + N local slide views (EMA teacher; RankMe monitor).",
    )


OBJECTIVES: dict[str, Callable[[], ObjectiveSpec]] = {
    "supervised": _supervised_spec,
    "latentmim": _latentmim_spec,
    "dino": _dino_spec,
}
