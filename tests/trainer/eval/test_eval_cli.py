"""pm-eval: every table shows the checkpoint and the baseline, JSON beside it; plots; predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from trainer.eval.cli import eval_main
from trainer.eval.embed import EmbedConfig, embed_store


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, eval_store, supervised_ckpt) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo-supervised"
    embed_store(str(supervised_ckpt), str(eval_store), out, EmbedConfig(per_region=True, progress=False))
    return out


def run(*args: str):
    return CliRunner().invoke(eval_main, list(args))


@pytest.mark.parametrize("command, json_name", [("linear-probe", "linear_probe"), ("knn", "knn")])
def test_probe_tables_show_both_rows_and_clamping(emb_dir, command, json_name) -> None:
    result = run(command, str(emb_dir))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "case-grouped CV, 6 labelled slides" in lines[0]
    for encoder in ("checkpoint", "baseline"):
        for feature in ("cls", "spatial"):
            assert any(f"demo-supervised · {encoder} · {feature}" in line and "3 folds" in line for line in lines)
    assert "qwk" not in result.output  # stain classes are not ordinal
    assert "note: folds clamped 5 → 3 (the rarest class has 3 cases)" in result.output
    rows = json.loads((emb_dir / "eval" / f"{json_name}.json").read_text())
    assert [(r["encoder"], r["feature"]) for r in rows] == [
        ("checkpoint", "cls"), ("checkpoint", "spatial"), ("baseline", "cls"), ("baseline", "spatial")]
    assert all(0 <= r["mean"]["balanced_accuracy"] <= 1 and len(r["per_fold"]) == 3 for r in rows)
    if command == "knn":
        assert "k clamped 20 → 2" in result.output and rows[0]["k"] == 2


def test_unsupervised_and_combined_table(emb_dir) -> None:
    result = run("unsupervised", str(emb_dir))
    assert result.exit_code == 0, result.output
    assert "demo-supervised · checkpoint" in result.output and "demo-supervised · baseline" in result.output
    rows = json.loads((emb_dir / "eval" / "unsupervised.json").read_text())
    assert rows[0]["slides"] == 7 and 1 <= rows[0]["mean"]["slide_rankme"] <= 7
    table = run("table", str(emb_dir), str(emb_dir), "--json", str(emb_dir.parent / "all.json"))
    assert table.exit_code == 0, table.output
    assert table.output.count("/demo-supervised · baseline · cls") == 4  # 2 folders × (linear, kNN)
    assert set(json.loads((emb_dir.parent / "all.json").read_text())) == {"linear", "knn", "unsupervised"}


def test_plots(emb_dir, eval_store, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pd.DataFrame([{"phase": "train", "step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]).to_csv(
        run_dir / "metrics.csv", index=False)
    out = tmp_path / "pictures"
    result = run("plots", str(emb_dir), "--store", str(eval_store), "--run", str(run_dir), "--out", str(out),
                 "--k", "2", "--max-slides", "1", "--perplexity", "30")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert "run-curves.png" in names and "tsne-checkpoint-cls.png" in names and "tsne-baseline-spatial.png" in names
    assert "clusters-checkpoint-tokens-blue-0-k2.png" in names and "clusters-checkpoint-cls-blue-0-k2.png" in names
    assert "t-SNE perplexity clamped 30 → 2 (7 slides)" in result.output
    assert run("plots").exit_code != 0


def test_predict_writes_probabilities_and_metrics(supervised_ckpt, eval_store, tmp_path) -> None:
    out = tmp_path / "pred.csv"
    result = run("predict", "--checkpoint", str(supervised_ckpt), "--store", str(eval_store), "--split", "val",
                 "--out", str(out), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert frame["slide_id"].tolist() == ["blue-2", "free-0", "red-2"]
    assert list(frame.columns) == ["slide_id", "label", "split", "case_id", "p_blue", "p_red", "predicted"]
    np.testing.assert_allclose(frame[["p_blue", "p_red"]].sum(axis=1), 1.0, rtol=1e-6)
    assert set(frame["predicted"]) <= {"blue", "red"}
    assert "predict (2 labelled slides)" in result.output and "balanced_accuracy" in result.output
    assert json.loads(out.with_suffix(".json").read_text())["slides"] == 2


def test_predict_refuses_an_ssl_checkpoint(ssl_ckpt, eval_store) -> None:
    result = run("predict", "--checkpoint", str(ssl_ckpt), "--store", str(eval_store), "--device", "cpu")
    assert result.exit_code != 0 and "no classification head" in result.output and "Traceback" not in result.output


def test_missing_or_unfinished_folder(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("linear-probe", str(tmp_path / "empty"))
    assert result.exit_code != 0 and "not an embeddings folder" in result.output


def test_a_checkpoint_written_by_pm_train(eval_store, tmp_path) -> None:
    """The real supervised path's checkpoint: embedded, then predicted with its own head."""
    from trainer.cli import main as train_main
    from trainer.eval.embeddings_format import open_embeddings

    trained = CliRunner().invoke(train_main, [
        "supervised", "--store", str(eval_store), "--out", str(tmp_path / "run"), "--model", "pixel_mamba_tiny",
        "--workers", "0", "--accum", "2", "--device", "cpu", "--max-steps", "1", "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    checkpoint = tmp_path / "run" / "last.pt"
    out = tmp_path / "emb"
    embed_store(str(checkpoint), str(eval_store), out, EmbedConfig(split="val", baseline=False, progress=False))
    assert open_embeddings(out).manifest["encoders"][0]["source"] == "encoder"
    result = run("predict", "--checkpoint", str(checkpoint), "--store", str(eval_store), "--split", "val",
                 "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "predictions-val.csv").is_file()
