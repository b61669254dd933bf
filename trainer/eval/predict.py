"""`pm-eval predict`: per-slide class probabilities of a supervised or fine-tuned checkpoint.

The checkpoint's own head (`load_encoder(..., with_head=True)`), Region Fusion as in
training (eval split mode). Slides whose label the checkpoint does not know are an
error; unlabelled slides get probabilities but are left out of the metrics.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from trainer.data.tile_dataset import TileStoreDataset
from trainer.engine.checkpoint import check_store_matches, load_checkpoint
from trainer.eval.embed import evenly_spaced
from trainer.eval.encoder_loading import load_encoder
from trainer.eval.metrics import classification_report
from trainer.objectives.supervised import is_ordinal


def predict_store(
    checkpoint: str,
    store: str,
    *,
    split: str | None = None,
    regions_per_slide: int = 0,
    device: torch.device | str = "cpu",
    ssm_backend: str = "auto",
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """(per-slide table, metrics). Table: slide_id, label, split, case_id, p_<class> per class
    (softmax, in class-id order), predicted (label name); metrics over the labelled slides."""
    payload = load_checkpoint(checkpoint)
    loaded = load_encoder(payload, with_head=True, device=device, ssm_backend=ssm_backend)
    label_map = loaded.label_map or {}
    if not label_map:
        raise ValueError("the checkpoint records no label map; it was not trained on labelled slides")
    dataset = TileStoreDataset(store, split=split, min_regions=1, max_regions=2**62, label_map=label_map)
    if len(dataset) == 0:
        raise ValueError(f"store {store!r} has no slides in split {split!r}")
    check_store_matches(payload, region_size=dataset.region_size, mpp=dataset.store_attrs.mpp)
    names = {v: k for k, v in label_map.items()}
    rows = []
    encoder = loaded.encoder
    with torch.inference_mode():
        for index in tqdm(range(len(dataset)), desc="predict", unit="slide", disable=not progress):
            sample = dataset[index]
            keep = torch.from_numpy(evenly_spaced(int(sample["regions"].shape[0]), regions_per_slide))
            logits = encoder(sample["regions"][keep].to(device)).logits.float()
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            label = int(sample["label"])
            table = dataset.table.iloc[index]
            rows.append({
                "slide_id": sample["slide_id"],
                "label": names.get(label) if label >= 0 else None,
                "split": table.get("split"), "case_id": table.get("case_id"),
                **{f"p_{names.get(c, c)}": float(p) for c, p in enumerate(probs)},
                "predicted": names.get(int(probs.argmax()), str(int(probs.argmax()))),
                "_label_id": label, "_predicted_id": int(probs.argmax()),
            })
    frame = pd.DataFrame(rows)
    labelled = frame[frame["_label_id"] >= 0]
    metrics: dict[str, float] = {}
    if len(labelled):
        metrics = classification_report(labelled["_label_id"].to_numpy(), labelled["_predicted_id"].to_numpy(),
                                        num_classes=loaded.num_classes, ordinal=is_ordinal(label_map))
        metrics["slides"] = float(len(labelled))
    return frame.drop(columns=["_label_id", "_predicted_id"]), metrics

