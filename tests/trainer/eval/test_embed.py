"""pm-embed on a tiny store with tiny checkpoints: shapes, ids, labels round-trip, h5, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SLIDES, write_eval_store

from pipeline.schema.reader import open_store
from trainer.engine.checkpoint import StoreMismatchError
from trainer.eval.cli import embed_main
from trainer.eval.embed import EmbedConfig, embed_slide, embed_store, evenly_spaced
from trainer.eval.embeddings_format import EmbeddingsError, open_embeddings, part_path
from trainer.eval.encoder_loading import load_encoder

C = 24  # pixel_mamba_tiny's embedding width


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, eval_store, supervised_ckpt) -> Path:
    out = tmp_path_factory.mktemp("emb") / "sup"
    embed_store(str(supervised_ckpt), str(eval_store), out, EmbedConfig(per_region=True, h5=True, progress=False))
    return out


def test_round_trip_of_ids_labels_and_shapes(embedded, eval_store) -> None:
    emb = open_embeddings(embedded)
    assert emb.encoders == ["checkpoint", "baseline"]
    table = emb.table.set_index("slide_id")
    assert sorted(table.index) == sorted(s[0] for s in SLIDES)  # the store's table order
    for slide_id, label, case, split, n in SLIDES:
        row = table.loc[slide_id]
        assert (row["case_id"], row["split"], row["n_regions"], row["n_embedded"]) == (case, split, n, n)
        assert row["label"] == label if label else np.isnan(row["label"])
        assert row["label_id"] == {"blue": 0, "red": 1, None: -1}[label]
    assert emb.label_map == {"blue": 0, "red": 1}
    assert emb.groups is not None and not emb.ordinal
    for encoder in emb.encoders:
        for feature in ("cls", "spatial"):
            x = emb.slide_features(encoder, feature)
            assert x.shape == (7, C) and x.dtype == np.float32 and np.isfinite(x).all()
    assert not np.allclose(emb.slide_features("checkpoint", "cls"), emb.slide_features("baseline", "cls"))
    store = open_store(str(eval_store))
    part = emb.slide_part("checkpoint", "red-1")
    arrays = store.read_slide("red-1")
    assert part["region_cls"].shape == (5, C) and part["region_tokens"].shape == (5, 8, 8, C)
    np.testing.assert_array_equal(part["coords"], arrays.coords)
    np.testing.assert_array_equal(part["origin"], arrays.origin)
    metrics = emb.slide_metrics("checkpoint")
    assert metrics["slide_id"].tolist() == emb.table["slide_id"].tolist()
    assert ((metrics["region_rankme"] >= 1) & (metrics["region_rankme"] <= 5)).all()
    assert ((metrics["token_cosine"] > -1) & (metrics["token_cosine"] <= 1)).all()


def test_slide_embedding_is_the_checkpoint_encoders(embedded, eval_store, supervised_ckpt) -> None:
    emb = open_embeddings(embedded)
    encoder = load_encoder(str(supervised_ckpt)).encoder
    regions = torch.from_numpy(np.array(open_store(str(eval_store)).read_slide("blue-0").regions))
    with torch.inference_mode():
        fused = encoder(regions)  # eval mode: alternating split, Region Fusion on as in training
        flat = encoder(regions, region_fusion=False)
    row = emb.table["slide_id"].tolist().index("blue-0")
    np.testing.assert_allclose(emb.slide_features("checkpoint", "cls")[row], fused.embedding.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.slide_features("checkpoint", "spatial")[row],
                               fused.spatial_tokens.mean(dim=(0, 1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.slide_part("checkpoint", "blue-0")["region_cls"], flat.cls_tokens.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_h5_files_hold_per_region_features_and_level0_coords(embedded, eval_store) -> None:
    origin = open_store(str(eval_store)).read_slide("red-0").origin
    with h5py.File(embedded / "h5" / "checkpoint" / "red-0.h5", "r") as handle:
        assert handle["features"].shape == (4, C) and handle["features"].dtype == np.float32
        np.testing.assert_array_equal(handle["coords"][...], origin)
        np.testing.assert_allclose(handle["features"][...], open_embeddings(embedded).slide_part("checkpoint", "red-0")["region_cls"])
    assert (embedded / "h5" / "baseline" / "free-0.h5").is_file()


def test_resume_skips_finished_slides_and_redoes_the_rest(tmp_path, eval_store, supervised_ckpt) -> None:
    out = tmp_path / "emb"
    config = EmbedConfig(split="val", baseline=False, progress=False)
    first = embed_store(str(supervised_ckpt), str(eval_store), out, config)
    assert (first.embedded, first.slides) == (3, 3)
    reference = open_embeddings(out).slide_features("checkpoint", "cls")
    assert open_embeddings(out).table["split"].tolist() == ["val"] * 3
    # A crash after one slide: its file is gone and the folder was never completed.
    part_path(out, "checkpoint", "red-2").unlink()
    manifest = json.loads((out / "embeddings.json").read_text())
    (out / "embeddings.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(EmbeddingsError, match="incomplete"):
        open_embeddings(out)
    kept = part_path(out, "checkpoint", "blue-2")
    os.utime(kept, (1, 1))
    again = embed_store(str(supervised_ckpt), str(eval_store), out, config)
    assert (again.embedded, again.skipped) == (1, 2) and kept.stat().st_mtime == 1
    np.testing.assert_allclose(open_embeddings(out).slide_features("checkpoint", "cls"), reference, rtol=1e-6)
    with pytest.raises(EmbeddingsError, match="other settings.*region_fusion"):
        embed_store(str(supervised_ckpt), str(eval_store), out, EmbedConfig(split="val", baseline=False,
                                                                             region_fusion=False, progress=False))


def test_store_at_another_resolution_is_refused(tmp_path, supervised_ckpt) -> None:
    store = write_eval_store(tmp_path / "mpp1.zarr", mpp=1.0)
    with pytest.raises(StoreMismatchError, match="store has 32 px regions at 1 µm/px"):
        embed_store(str(supervised_ckpt), str(store), tmp_path / "emb", EmbedConfig(progress=False))


def test_evenly_spaced_cap() -> None:
    assert evenly_spaced(5, 0).tolist() == [0, 1, 2, 3, 4] and evenly_spaced(9, 3).tolist() == [0, 4, 8]


def test_embed_slide_without_fusion_is_one_pass_per_region() -> None:
    from trainer.models.registry import build_model

    encoder = build_model("pixel_mamba_tiny").eval()
    regions = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    result = embed_slide(encoder, regions, region_fusion=False)
    np.testing.assert_allclose(result.cls, result.region_cls.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert result.metrics["n_survivors"] == 3


def test_cli_with_an_ssl_checkpoint_and_the_student(tmp_path, eval_store, ssl_ckpt) -> None:
    out = tmp_path / "emb"
    args = ["--checkpoint", str(ssl_ckpt), "--store", str(eval_store), "--out", str(out), "--split", "val",
            "--encoder", "student", "--no-baseline", "--device", "cpu", "--no-progress", "--regions-per-slide", "3"]
    result = CliRunner().invoke(embed_main, args)
    assert result.exit_code == 0, result.output
    assert "embedded 3 slides" in result.output and "at most 3 evenly spaced regions" in result.output
    emb = open_embeddings(out)
    assert emb.manifest["encoders"] == [{"name": "checkpoint", "source": "student", "model_name": "pixel_mamba_tiny",
                                         "objective": "latentmim", "notes": []}]
    assert emb.table["n_embedded"].tolist() == [3, 3, 3] and emb.label_map == {"blue": 0, "red": 1}
    refused = CliRunner().invoke(embed_main, [*args, "--no-region-fusion"])
    assert refused.exit_code != 0 and "other settings" in refused.output and "Traceback" not in refused.output
    missing = CliRunner().invoke(embed_main, [*args[:2], "--store", str(tmp_path / "none.zarr"), "--out",
                                              str(tmp_path / "x"), "--device", "cpu"])
    assert missing.exit_code != 0 and "Traceback" not in missing.output
