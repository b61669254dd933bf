"""Collating samples: one slide per micro-step, or a micro-batch of equal-shape samples.

`batch_size` 1 (slides differ in length): the sample itself. `batch_size` B > 1
(image folders, equal-size views; the region count may differ, the region shape may
not): one sample whose regions are the B samples'
regions one after another, with a view index per region, as the model's packed
forward takes them:

    regions  (B·n, R, R, 3) uint8      segments (B·n,) long: sample b's regions have b
    coords   (B·n, 2) long             label    (B,) long
    target   (B, K) float (when every sample has one)
    slide_id, index, position: lists of B entries; "batch_size": B
"""

from __future__ import annotations

from typing import Any

import torch

Sample = dict[str, Any]

STACKED = ("regions", "coords")
PER_SAMPLE_TENSORS = ("label", "target")


def collate_samples(batch: list[Sample]) -> Sample:
    """The single sample for a batch of one; the packed micro-batch (module docstring) otherwise."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if len(batch) == 1:
        return batch[0]
    shapes = {tuple(s["regions"].shape[1:]) for s in batch}
    if len(shapes) != 1:
        raise ValueError(f"a micro-batch needs regions of one shape, got {sorted(shapes)}")
    out: Sample = {
        "regions": torch.cat([s["regions"] for s in batch]),
        "coords": torch.cat([torch.as_tensor(s["coords"]) for s in batch]),
        "segments": torch.cat(
            [torch.full((s["regions"].shape[0],), b, dtype=torch.long) for b, s in enumerate(batch)]
        ),
        "label": torch.stack([torch.as_tensor(s["label"]).reshape(()) for s in batch]),
        "batch_size": len(batch),
    }
    if all("target" in s for s in batch):
        out["target"] = torch.stack([s["target"] for s in batch])
    for key in batch[0]:
        if key not in out and key not in STACKED + PER_SAMPLE_TENSORS:
            out[key] = [s.get(key) for s in batch]
    return out


def batch_size_of(sample: Sample) -> int:
    """How many samples a (collated) sample holds."""
    return int(sample.get("batch_size", 1))
