"""Checkpoints: atomic files that load with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain containers (dict, list, str, int,
float, bool, None), so loading it never runs arbitrary pickle code:

    {"format": "pixel-mamba-checkpoint", "version": 1,
     "model": the exported encoder's state_dict (the objective's `exported_encoder()`:
              the EMA teacher for LatentMIM and DINO, the trained encoder, head included,
              for supervised), "model_source": "encoder" | "teacher",
     "student": the trained encoder's state_dict (only when model_source == "teacher"),
     "model_name": str, "model_overrides": build_model kwargs, "model_config": dict,
     "objective_name": str, "objective": objective state_dict without the encoder (heads, teachers, centres),
     "optimizer": ..., "scaler": ... or None,
     "step": optimizer steps done, "epoch": current epoch, "position": samples of this epoch consumed (per rank),
     "rng": {"python": [...], "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor...]},
     "config": the run's recipe as a plain dict, "label_map": {label: id} or None,
     "region_size": px, "mpp": µm/px or None (image folders), "normalization": {"mean": [..], "std": [..]},
     "metrics": {"best_metric": name, "best_value": float or None, ...},
     "settings": what fixes the data order and schedules (seed, accum_steps, batch_size,
                 world_size, samples_per_epoch, epochs, objective); resume compares them}

Objective extras (`checkpoint_extras`) may add keys but never overwrite these
(`RESERVED_KEYS`). Files are written next to their target, fsynced, renamed into
place in one step, and the folder is fsynced after the rename, so neither a crash
nor a power loss leaves a truncated `last.pt` or `best.pt`.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.schema.commit import fsync_dir  # the one durable-rename helper both halves use

CHECKPOINT_FORMAT = "pixel-mamba-checkpoint"
CHECKPOINT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"

RESERVED_KEYS = frozenset({
    "format", "version", "model", "model_source", "student", "model_name", "model_overrides", "model_config",
    "objective_name", "objective", "optimizer", "scaler", "step", "epoch", "position", "world_size",
    "samples_per_epoch", "rng", "config", "region_size", "mpp", "magnification", "normalization",
    "data_source", "metrics", "settings",
})


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the run."""


class StoreMismatchError(CheckpointError):
    """A store's region size or MPP differs from the checkpoint's."""


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors and lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def atomic_save(payload: dict[str, Any], path: str | Path) -> Path:
    """`torch.save` to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_copy(source: str | Path, target: str | Path) -> Path:
    """Copy a finished checkpoint to `target` (write aside, then rename)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (on CPU); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-checkpoint files
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{str(path)!r} is not a Pixel-Mamba checkpoint (no 'model' entry)")
    return payload


def describe_input(region_size: int | None, mpp: float | None) -> str:
    """'224 px regions at 2.0 µm/px' (or '… at an unknown resolution')."""
    size = f"{region_size} px regions" if region_size else "regions of unknown size"
    where = f"at {mpp:g} µm/px" if mpp is not None else "at an unrecorded resolution (image folder)"
    return f"{size} {where}"


def check_store_matches(
    checkpoint: dict[str, Any], *, region_size: int, mpp: float | None, require_mpp: bool = True
) -> None:
    """Refuse a store whose region size or MPP differs from what the checkpoint was trained on.

    require_mpp=False (initialising a WSI run from an ImageNet checkpoint) accepts a
    checkpoint that records no MPP; a recorded MPP must still match.
    """
    ckpt_size = checkpoint.get("region_size")
    ckpt_mpp = checkpoint.get("mpp")
    size_ok = ckpt_size is None or int(ckpt_size) == int(region_size)
    if ckpt_mpp is None:
        mpp_ok = not require_mpp or mpp is None
    else:
        mpp_ok = mpp is not None and abs(float(ckpt_mpp) - float(mpp)) <= 1e-6 * max(1.0, abs(float(mpp)))
    if not (size_ok and mpp_ok):
        raise StoreMismatchError(
            f"checkpoint was trained on {describe_input(ckpt_size, ckpt_mpp)}, "
            f"store has {describe_input(region_size, mpp)}; use a store built at the checkpoint's "
            "magnification and region size"
        )


def check_normalization(checkpoint: dict[str, Any], *, mean: list[float], std: list[float]) -> None:
    """Refuse a model whose input normalisation differs from the checkpoint's."""
    norm = checkpoint.get("normalization") or {}
    if not norm:
        return
    same = np.allclose(norm["mean"], mean) and np.allclose(norm["std"], std)
    if not same:
        raise CheckpointError(
            f"checkpoint normalises inputs with mean {norm['mean']} / std {norm['std']}, "
            f"the model with mean {list(mean)} / std {list(std)}"
        )


def load_encoder_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, skip_prefixes: tuple[str, ...] = ("head.",)
) -> dict[str, list[str]]:
    """Initialise `model` from another run's encoder weights, leaving out `skip_prefixes` (the head).

    Returns {"missing": model keys not in `state` (kept at their fresh init),
    "unexpected": `state` keys the model lacks, "skipped": keys left out on purpose}.
    A key present on both sides with another shape is an error (wrong variant).
    """
    own = model.state_dict()
    skipped = sorted(k for k in state if k.startswith(skip_prefixes))
    usable = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in usable.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise CheckpointError("checkpoint weights do not fit this model (another variant?): " + "; ".join(wrong[:5]))
    result = model.load_state_dict({k: v for k, v in usable.items() if k in own}, strict=False)
    return {
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(k for k in usable if k not in own),
        "skipped": skipped,
    }
