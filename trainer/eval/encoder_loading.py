"""Build the encoder a checkpoint describes, with the weights of the chosen source.

Checkpoints (see `trainer.engine.checkpoint` and the SSL contract) carry "model"
(the exported encoder: the EMA teacher for LatentMIM and DINO, the trained
encoder with its head for supervised runs), "model_source" ("encoder" or
"teacher"; absent in older checkpoints, read as "encoder"), "student" (only
when "model" is a teacher), "model_name" and "model_overrides" (the kwargs of
`trainer.models.registry.build_model`).

`which`:
- "export" (default): the checkpoint's "model";
- "teacher": the same, but refused when the checkpoint has no teacher;
- "student": "student" when the checkpoint has one, else the "model" of a
  single-encoder (supervised) run, which is the trained encoder itself.

`with_head=False` builds the variant with `num_classes=0` and leaves the
`head.` weights out (embedding); `with_head=True` keeps the head (prediction).
The encoder comes back in eval mode: alternating Region Fusion split, no drop path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from trainer.engine.checkpoint import CheckpointError, load_checkpoint, load_encoder_weights
from trainer.models.pixel_mamba import PixelMamba
from trainer.models.registry import build_model

EncoderChoice = Literal["export", "teacher", "student"]
ENCODER_CHOICES: tuple[str, ...] = ("export", "teacher", "student")
BASELINE_SEED = 0


@dataclass(frozen=True, kw_only=True)
class LoadedEncoder:
    """An encoder ready for inference and what the checkpoint says about its input.

    source: which weights were loaded ("teacher", "student", "encoder", or "random" for a baseline).
    label_map: {label: class id} of a supervised run, else None.
    """

    encoder: PixelMamba
    model_name: str
    overrides: dict[str, Any]
    source: str
    region_size: int | None
    mpp: float | None
    objective_name: str | None
    label_map: dict[str, int] | None
    notes: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return int(self.encoder.config.num_classes)


def model_source(payload: dict[str, Any]) -> str:
    """"encoder" or "teacher": what the checkpoint's "model" entry holds."""
    source = str(payload.get("model_source") or "encoder")
    if source not in ("encoder", "teacher"):
        raise CheckpointError(f"checkpoint model_source must be 'encoder' or 'teacher', got {source!r}")
    return source


def _select_state(payload: dict[str, Any], which: str) -> tuple[dict[str, torch.Tensor], str]:
    if which not in ENCODER_CHOICES:
        raise ValueError(f"encoder must be one of {ENCODER_CHOICES}, got {which!r}")
    source = model_source(payload)
    if which == "teacher" and source != "teacher":
        raise CheckpointError(
            f"this checkpoint has no teacher (objective {payload.get('objective_name', 'unknown')!r} trains one "
            "encoder); use --encoder student or leave --encoder out"
        )
    if which == "student" and source == "teacher":
        if "student" not in payload:
            raise CheckpointError("the checkpoint exports a teacher but holds no 'student' weights")
        return payload["student"], "student"
    return payload["model"], source


def _build(payload: dict[str, Any], *, with_head: bool, ssm_backend: str) -> tuple[PixelMamba, str, dict[str, Any]]:
    name = payload.get("model_name")
    if not name:
        raise CheckpointError("checkpoint names no model variant ('model_name'); it predates the model registry")
    overrides = dict(payload.get("model_overrides") or {})
    if "region_size" not in overrides and payload.get("region_size"):
        overrides["region_size"] = int(payload["region_size"])
    if not with_head:
        overrides["num_classes"] = 0
    # Inference: every backend computes the same function, no activation checkpointing needed.
    overrides["ssm_backend"] = ssm_backend
    overrides["checkpoint_layers"] = 0
    try:
        model = build_model(str(name), **overrides)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build model {name!r} from the checkpoint: {exc.args[0]}") from None
    return model, str(name), overrides


def load_encoder(
    checkpoint: str | dict[str, Any],
    *,
    which: EncoderChoice = "export",
    with_head: bool = False,
    device: torch.device | str = "cpu",
    ssm_backend: str = "auto",
) -> LoadedEncoder:
    """The checkpoint's encoder (path or loaded payload) in eval mode on `device`.

    Every encoder weight must be present in the checkpoint (a missing key means
    another variant); with_head=True also needs the head (a supervised checkpoint).
    """
    payload = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state, source = _select_state(payload, which)
    model, name, overrides = _build(payload, with_head=with_head, ssm_backend=ssm_backend)
    if with_head and model.head is None:
        raise CheckpointError(
            f"the checkpoint's model has no classification head (objective {payload.get('objective_name')!r}); "
            "evaluate its embeddings with pm-embed and pm-eval linear-probe instead"
        )
    report = load_encoder_weights(model, state, skip_prefixes=() if with_head else ("head.",))
    if report["missing"]:
        raise CheckpointError(
            f"the checkpoint's {source} weights lack {len(report['missing'])} key(s) of {name!r} "
            f"(another variant?): {', '.join(report['missing'][:5])}"
        )
    notes = (f"ignored {len(report['unexpected'])} checkpoint key(s) the model lacks",) if report["unexpected"] else ()
    label_map = payload.get("label_map")
    return LoadedEncoder(
        encoder=model.to(device).eval(),
        model_name=name,
        overrides=overrides,
        source=source,
        region_size=payload.get("region_size"),
        mpp=payload.get("mpp"),
        objective_name=payload.get("objective_name"),
        label_map={str(k): int(v) for k, v in label_map.items()} if label_map else None,
        notes=notes,
    )


def random_baseline(
    loaded: LoadedEncoder, *, seed: int = BASELINE_SEED, device: torch.device | str = "cpu"
) -> LoadedEncoder:
    """A randomly initialised encoder of the same variant and overrides (fixed seed, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(loaded.model_name, **loaded.overrides)
    return LoadedEncoder(
        encoder=model.to(device).eval(),
        model_name=loaded.model_name,
        overrides=dict(loaded.overrides),
        source="random",
        region_size=loaded.region_size,
        mpp=loaded.mpp,
        objective_name=None,
        label_map=loaded.label_map,
        notes=(f"random init, seed {seed}",),
    )
