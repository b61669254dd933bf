"""`pm-embed`: run a checkpoint's encoder (and a random-init baseline) over a tile store.

Per slide and encoder, `embed_slide` makes two passes in eval mode (one when
Region Fusion is off for the slide embeddings):
- Region Fusion as in training (alternating split): the slide embeddings, the mean of
  the surviving CLS tokens ("cls") and of all surviving spatial tokens ("spatial");
- Region Fusion off: one CLS token and one token grid per region, in the regions'
  order, so they line up with coords; the token- and region-level metrics are
  computed from them here and only stored with `per_region`.

Slides are sharded over torchrun ranks (slide i on rank i mod world); every
finished slide is one file renamed into place, so a crash keeps every finished
slide and a re-run skips them. Rank 0 writes the consolidated table and arrays
once all ranks are done (see `trainer.eval.embeddings_format`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from trainer.data.tile_dataset import TileStoreDataset
from trainer.engine.checkpoint import check_store_matches, load_checkpoint
from trainer.engine.distributed import DistEnv, barrier
from trainer.eval import embeddings_format as fmt
from trainer.eval.encoder_loading import BASELINE_SEED, EncoderChoice, LoadedEncoder, load_encoder, random_baseline
from trainer.eval.metrics import embedding_quality
from trainer.models.pixel_mamba import PixelMamba
from trainer.objectives.supervised import is_ordinal


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """pm-embed settings.

    split: embed only this split's slides (None: every slide of the store).
    region_fusion: slide embeddings with Region Fusion as in training (False: without).
    encoder: which weights of the checkpoint ("export", "teacher", "student"; see encoder_loading).
    baseline: also embed a random-init encoder of the same variant (seed baseline_seed).
    per_region: store per-region CLS tokens and token grids in each slide's file.
    h5: also write CLAM/TRIDENT-style HDF5 files (features = per-region CLS tokens).
    regions_per_slide: embed at most this many regions per slide, evenly spaced in grid
        order (the same every run); 0 = all. A CPU-time cap for demos.
    min_regions: skip slides with fewer regions.
    """

    split: str | None = None
    region_fusion: bool = True
    encoder: EncoderChoice = "export"
    baseline: bool = True
    baseline_seed: int = BASELINE_SEED
    per_region: bool = False
    h5: bool = False
    regions_per_slide: int = 0
    min_regions: int = 1
    ssm_backend: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.regions_per_slide < 0 or self.min_regions < 1:
            raise ValueError(f"need regions_per_slide >= 0 and min_regions >= 1, got "
                             f"{self.regions_per_slide}, {self.min_regions}")


@dataclass(frozen=True)
class SlideEmbedding:
    """One slide through one encoder.

    cls, spatial: (C,) slide embeddings; region_cls (n, C), region_tokens (n, h, w, C): the
    pass without Region Fusion; metrics: token/region RankMe and cosine, n_survivors.
    """

    cls: np.ndarray
    spatial: np.ndarray
    region_cls: np.ndarray
    region_tokens: np.ndarray
    metrics: dict[str, float]


@dataclass(frozen=True)
class EmbedResult:
    out: Path
    embedded: int
    skipped: int
    slides: int
    notes: tuple[str, ...]


def evenly_spaced(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` of n items, evenly spaced and sorted (all when limit is 0 or ≥ n)."""
    if not limit or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


@torch.inference_mode()
def embed_slide(encoder: PixelMamba, regions: torch.Tensor, *, region_fusion: bool) -> SlideEmbedding:
    """Embed one slide; regions (n, R, R, 3) uint8 on the encoder's device; the encoder in eval mode."""
    flat = encoder(regions, region_fusion=False)
    region_cls = flat.cls_tokens.float()
    region_tokens = flat.spatial_tokens.float()
    if region_fusion:
        fused = encoder(regions, region_fusion=True)
        cls, spatial, survivors = fused.embedding.float(), fused.spatial_tokens.float().mean(dim=(0, 1, 2)), \
            fused.cls_tokens.shape[0]
    else:
        cls, spatial, survivors = flat.embedding.float(), region_tokens.mean(dim=(0, 1, 2)), region_cls.shape[0]
    token = embedding_quality(region_tokens.reshape(-1, region_tokens.shape[-1]))
    region = embedding_quality(region_cls)
    metrics = {
        "token_rankme": token["rankme"], "token_cosine": token["cosine"],
        "region_rankme": region["rankme"], "region_cosine": region["cosine"],
        "n_survivors": float(survivors),
    }
    return SlideEmbedding(
        cls=cls.cpu().numpy(), spatial=spatial.cpu().numpy(), region_cls=region_cls.cpu().numpy(),
        region_tokens=region_tokens.cpu().numpy(), metrics=metrics,
    )


def _settings(checkpoint: str, payload: dict[str, Any], store: str, config: EmbedConfig) -> dict[str, Any]:
    """What must match for a re-run to reuse finished slides."""
    kept = asdict(config)
    for volatile in ("progress", "ssm_backend"):
        kept.pop(volatile)
    return {
        **kept,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_step": payload.get("step"),
        "store": store,
    }


def _prepare_manifest(out: Path, settings: dict[str, Any], manifest: dict[str, Any], env: DistEnv) -> None:
    """Rank 0 writes (or checks) embeddings.json before any rank writes a slide."""
    path = out / fmt.MANIFEST
    if env.is_main:
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                                 if settings.get(k) != old.get("settings", {}).get(k))
                raise fmt.EmbeddingsError(
                    f"{out} holds embeddings written with other settings ({', '.join(changed)} differ); "
                    "use another --out or pass --overwrite"
                )
        out.mkdir(parents=True, exist_ok=True)
        fmt.write_json(path, {**manifest, "settings": settings, "complete": False})
    barrier(env)


def embed_store(
    checkpoint: str,
    store: str,
    out: str | Path,
    config: EmbedConfig = EmbedConfig(),
    *,
    device: torch.device | str = "cpu",
    env: DistEnv = DistEnv(),
) -> EmbedResult:
    """Embed the store's slides (this rank's share) and, on rank 0, consolidate the folder."""
    out = Path(out)
    device = torch.device(device)
    payload = load_checkpoint(checkpoint)
    dataset = TileStoreDataset(store, split=config.split, min_regions=config.min_regions, max_regions=2**62)
    if len(dataset) == 0:
        raise fmt.EmbeddingsError(f"store {store!r} has no slides in split {config.split!r} "
                                  f"with >= {config.min_regions} regions")
    check_store_matches(payload, region_size=dataset.region_size, mpp=dataset.store_attrs.mpp)
    loaded = load_encoder(payload, which=config.encoder, device=device, ssm_backend=config.ssm_backend)
    encoders: dict[str, LoadedEncoder] = {fmt.CHECKPOINT_ENCODER: loaded}
    if config.baseline:
        encoders[fmt.BASELINE_ENCODER] = random_baseline(loaded, seed=config.baseline_seed, device=device)
    fusion = config.region_fusion and bool(loaded.encoder.config.region_fusion)
    notes = list(loaded.notes)
    if config.region_fusion and not fusion:
        notes.append("the checkpoint's model was trained without Region Fusion: slide embeddings without it")

    label_map = dict(dataset.label_map)
    manifest = {
        "format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION,
        "encoders": [
            {"name": name, "source": enc.source, "model_name": enc.model_name, "objective": enc.objective_name,
             "notes": list(enc.notes)}
            for name, enc in encoders.items()
        ],
        "label_map": label_map, "ordinal": is_ordinal(label_map),
        "embed_dim": int(loaded.encoder.embed_dim), "token_grid": list(loaded.encoder.config.final_grid),
        "region_size": dataset.region_size, "mpp": dataset.store_attrs.mpp, "slide_fusion": fusion,
    }
    settings = _settings(checkpoint, payload, dataset.url, config)
    _prepare_manifest(out, settings, manifest, env)

    mine = list(range(env.rank, len(dataset), env.world_size))
    todo = [i for i in mine if not _finished(out, encoders, dataset.slide_ids[i], config)]
    bar = tqdm(total=len(todo), desc="embed", unit="slide", disable=not (config.progress and env.is_main),
               dynamic_ncols=True)
    for index in todo:
        sample = dataset[index]
        keep = evenly_spaced(int(sample["regions"].shape[0]), config.regions_per_slide)
        regions = sample["regions"][torch.from_numpy(keep)].to(device)
        slide_id = sample["slide_id"]
        origin = None
        if config.per_region or config.h5:
            origin = np.asarray(dataset.store.read_slide(slide_id).origin)[keep]
        for name, enc in encoders.items():
            result = embed_slide(enc.encoder, regions, region_fusion=fusion)
            _write_slide(out, name, slide_id, result, keep, sample["coords"].numpy()[keep], origin, config, dataset)
        bar.update(1)
    bar.close()

    barrier(env)
    if env.is_main:
        _consolidate(out, dataset, list(encoders), config)
    barrier(env)
    skipped = len(mine) - len(todo)
    if skipped:
        notes.append(f"skipped {skipped} slide(s) already embedded by an earlier run")
    if config.regions_per_slide:
        notes.append(f"at most {config.regions_per_slide} evenly spaced regions per slide (--regions-per-slide)")
    return EmbedResult(out=out, embedded=len(todo), skipped=skipped, slides=len(dataset), notes=tuple(notes))


def _finished(out: Path, encoders: dict[str, LoadedEncoder], slide_id: str, config: EmbedConfig) -> bool:
    done = all(fmt.part_path(out, name, slide_id).is_file() for name in encoders)
    if config.h5:
        done = done and all(fmt.h5_path(out, name, slide_id).is_file() for name in encoders)
    return done


def _write_slide(out: Path, encoder: str, slide_id: str, result: SlideEmbedding, keep: np.ndarray,
                 coords: np.ndarray, origin: np.ndarray | None, config: EmbedConfig,
                 dataset: TileStoreDataset) -> None:
    arrays: dict[str, Any] = {"cls": result.cls, "spatial": result.spatial, "n_embedded": np.int64(len(keep)),
                              **{k: np.float64(v) for k, v in result.metrics.items()}}
    if config.per_region:
        arrays.update(region_cls=result.region_cls, region_tokens=result.region_tokens, region_index=keep,
                      coords=coords.astype(np.int64), origin=np.asarray(origin, dtype=np.int64))
    if config.h5:  # the HDF5 file first: a slide counts as done once its .npz exists
        fmt.write_h5(out, encoder, slide_id, features=result.region_cls, coords=origin,
                     attrs={"region_size": dataset.region_size, "mpp": float(dataset.store_attrs.mpp or 0.0),
                            "coords_order": "x,y level-0 px"})
    fmt.write_part(out, encoder, slide_id, arrays)


def _consolidate(out: Path, dataset: TileStoreDataset, encoders: list[str], config: EmbedConfig) -> None:
    """slides.csv, the (N, C) arrays and slide_metrics.csv from the per-slide files; then complete = true."""
    table = dataset.table
    ids = dataset.slide_ids
    missing = [s for s in ids for name in encoders if not fmt.part_path(out, name, s).is_file()]
    if missing:
        raise fmt.EmbeddingsError(f"{len(missing)} slide file(s) missing after embedding (a rank failed?): "
                                  f"{', '.join(sorted(set(missing))[:5])}")
    n_embedded = []
    for name in encoders:
        cls, spatial, rows = [], [], []
        for slide_id in ids:
            with np.load(fmt.part_path(out, name, slide_id)) as part:
                cls.append(part["cls"])
                spatial.append(part["spatial"])
                rows.append({"slide_id": slide_id, **{k: float(part[k]) for k in fmt.METRIC_KEYS}})
                if name == encoders[0]:
                    n_embedded.append(int(part["n_embedded"]))
        fmt.write_slide_arrays(out, name, {"cls": np.stack(cls), "spatial": np.stack(spatial)})
        fmt.write_csv(out / name / fmt.SLIDE_METRICS, pd.DataFrame(rows))
    inverse = {v: k for k, v in dataset.label_map.items()}
    slides = pd.DataFrame({
        "slide_id": ids,
        "label": [inverse.get(int(v)) for v in dataset.labels],
        "label_id": dataset.labels.astype(np.int64),
        # a store without splits gets a random one when --split is given: every kept slide is in it
        "split": [config.split] * len(ids) if config.split is not None
        else (table["split"].tolist() if "split" in table.columns else [None] * len(ids)),
        "case_id": table["case_id"].tolist() if "case_id" in table.columns else [None] * len(ids),
        "n_regions": dataset.n_regions.astype(np.int64),
        "n_embedded": n_embedded,
    })
    fmt.write_csv(out / fmt.SLIDE_TABLE, slides)
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    fmt.write_json(out / fmt.MANIFEST, {**manifest, "complete": True, "slides": len(ids)})

