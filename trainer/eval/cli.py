"""`pm-embed` and `pm-eval`: wiring only (the work is in embed, probe, report, pictures, predict).

    pm-embed --checkpoint CKPT --store S --out EMB [--split val] [--per-region] [--format h5] ...
    pm-eval linear-probe|knn|unsupervised EMB      table + EMB/eval/<command>.json
    pm-eval table EMB [EMB ...]                    all three for several runs, one table each
    pm-eval plots EMB [--store S] [--run RUN ...]  t-SNE, cluster maps, training curves (PNG)
    pm-eval predict --checkpoint CKPT --store S [--split test]   per-slide probabilities (CSV) + metrics
    torchrun --nproc_per_node N -m trainer.eval.cli embed ...    slides sharded over ranks
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.schema.errors import TileStoreError
from trainer.engine.checkpoint import CheckpointError
from trainer.eval import report
from trainer.eval.embeddings_format import SLIDE_LEVEL_FEATURES, EmbeddingsError, open_embeddings
from trainer.eval.encoder_loading import ENCODER_CHOICES
from trainer.eval.probe import ProbeConfig

FEATURES = click.Choice([*SLIDE_LEVEL_FEATURES, "both"])
USER_ERRORS = (CheckpointError, EmbeddingsError, TileStoreError, ValueError, KeyError, FileNotFoundError)


def _device(name: str):
    from trainer.cli import resolve_device

    return resolve_device(name)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))


@click.command("pm-embed")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt) of any objective.")
@click.option("--store", required=True, type=str, help="Tile store (path or URL).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Embeddings folder to write.")
@click.option("--split", default=None, help="Embed only this split's slides (default: every slide).")
@click.option("--no-region-fusion", is_flag=True, help="Slide embeddings without Region Fusion (one pass).")
@click.option("--encoder", "which", type=click.Choice(ENCODER_CHOICES), default="export", show_default=True,
              help="export = the checkpoint's model (the EMA teacher for LatentMIM/DINO); teacher; student.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "h5"]), default="zarr", show_default=True,
              help="zarr: the embeddings folder; h5: also one CLAM/TRIDENT-style HDF5 per slide.")
@click.option("--no-baseline", is_flag=True, help="Skip the random-init encoder of the same variant.")
@click.option("--baseline-seed", type=int, default=0, show_default=True)
@click.option("--per-region", is_flag=True, help="Also store per-region CLS tokens and token grids (for maps).")
@click.option("--regions-per-slide", type=int, default=0, show_default=True,
              help="At most this many evenly spaced regions per slide (0 = all); a CPU-time cap.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--ssm-backend", default="auto", show_default=True, help="Selective-scan backend for inference.")
@click.option("--overwrite", is_flag=True, help="Replace an existing embeddings folder.")
@click.option("--no-progress", is_flag=True)
def embed_main(**options: Any) -> None:
    """Embed a tile store's slides with a checkpoint's encoder (and a random-init baseline)."""
    from trainer.engine.distributed import init_distributed, shutdown_distributed
    from trainer.eval.embed import EmbedConfig, embed_store

    out = Path(options["out_dir"])
    device = _device(options["device"])
    env = init_distributed(device)
    if env.local_rank == 0 and env.is_main and options["overwrite"] and out.exists():
        shutil.rmtree(out)
    try:
        config = EmbedConfig(
            split=options["split"], region_fusion=not options["no_region_fusion"], encoder=options["which"],
            baseline=not options["no_baseline"], baseline_seed=options["baseline_seed"],
            per_region=options["per_region"], h5=options["fmt"] == "h5",
            regions_per_slide=options["regions_per_slide"], ssm_backend=options["ssm_backend"],
            progress=not options["no_progress"],
        )
        if device.type == "cuda" and env.enabled:
            import torch

            device = torch.device("cuda", env.local_rank)
        result = embed_store(options["checkpoint"], options["store"], out, config, device=device, env=env)
    except USER_ERRORS as exc:
        raise _fail(exc) from None
    finally:
        shutdown_distributed()
    if env.is_main:
        for note in result.notes:
            click.echo(f"note: {note}")
        click.echo(f"embedded {result.slides} slides into {out.resolve()} "
                   f"({result.embedded} on this rank now, {result.skipped} reused)")


@click.group("pm-eval")
def eval_main() -> None:
    """Evaluate embeddings (linear probe, kNN, unsupervised), predict with a classifier, draw pictures."""


def _open(path: str):
    try:
        return open_embeddings(path)
    except EmbeddingsError as exc:
        raise click.ClickException(str(exc)) from None


def _features(choice: str) -> tuple[str, ...]:
    return SLIDE_LEVEL_FEATURES if choice == "both" else (choice,)


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.jsonable(payload), indent=2) + "\n")
    return path


def _print_probe(rows: list[dict[str, Any]], metrics: list[str], title: str) -> None:
    click.echo(report.format_table(rows, metrics, title=title))
    for note in report.notes_of(rows):
        click.echo(f"note: {note}")


def _probe_command(method: str, emb_path: str, feature: str, folds: int, k: int, seed: int, json_path: str | None):
    emb = _open(emb_path)
    rows = report.probe_rows(emb, method, features=_features(feature),  # type: ignore[arg-type]
                             config=ProbeConfig(folds=folds, k=k, seed=seed))
    grouped = "case-grouped" if emb.groups is not None else "stratified"
    _print_probe(rows, report.probe_metric_names(emb),
                 f"{report.METHOD_TITLES[method]} ({grouped} CV, {int(np.sum(emb.labels >= 0))} labelled slides)")
    name = "linear_probe" if method == "linear" else "knn"
    out = _write_json(Path(json_path) if json_path else emb.root / "eval" / f"{name}.json", rows)
    click.echo(f"wrote {out}")


def _probe_options(func):
    for option in reversed([
        click.argument("emb", type=click.Path(exists=True, file_okay=False)),
        click.option("--feature", type=FEATURES, default="both", show_default=True,
                     help="cls = mean-pooled CLS tokens, spatial = mean-pooled spatial tokens."),
        click.option("--folds", type=int, default=5, show_default=True, help="CV folds (clamped to the data)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                     help="JSON output (default EMB/eval/<command>.json)."),
    ]):
        func = option(func)
    return func


@eval_main.command("linear-probe")
@_probe_options
def linear_probe_cmd(emb: str, feature: str, folds: int, seed: int, json_path: str | None) -> None:
    """Cross-validated logistic regression on standardised slide embeddings."""
    _probe_command("linear", emb, feature, folds, 20, seed, json_path)


@eval_main.command("knn")
@_probe_options
@click.option("--k", type=int, default=20, show_default=True, help="Neighbours (clamped to the data).")
def knn_cmd(emb: str, feature: str, folds: int, seed: int, json_path: str | None, k: int) -> None:
    """Cross-validated cosine kNN on slide embeddings."""
    _probe_command("knn", emb, feature, folds, k, seed, json_path)


@eval_main.command("unsupervised")
@click.argument("emb", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def unsupervised_cmd(emb: str, json_path: str | None) -> None:
    """RankMe and mean pairwise cosine at token, region and slide level."""
    embeddings = _open(emb)
    rows = report.unsupervised_rows(embeddings)
    click.echo(report.format_table(rows, report.UNSUPERVISED_COLUMNS,
                                   title=f"unsupervised ({rows[0]['slides']} slides)"))
    out = Path(json_path) if json_path else embeddings.root / "eval" / "unsupervised.json"
    click.echo(f"wrote {_write_json(out, rows)}")


@eval_main.command("table")
@click.argument("embs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--feature", type=FEATURES, default="both", show_default=True)
@click.option("--folds", type=int, default=5, show_default=True)
@click.option("--k", type=int, default=20, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="JSON output (default: eval.json beside the first folder).")
def table_cmd(embs: tuple[str, ...], feature: str, folds: int, k: int, json_path: str | None) -> None:
    """Linear probe, kNN and unsupervised metrics of several embeddings folders (e.g. one per run)."""
    opened = [_open(path) for path in embs]
    names = [Path(path).name for path in embs]
    if len(set(names)) < len(names):  # e.g. runs/X/embeddings for several runs: name rows by the run
        names = [f"{Path(path).resolve().parent.name}/{Path(path).name}" for path in embs]
    config = ProbeConfig(folds=folds, k=k)
    result: dict[str, Any] = {}
    for method in ("linear", "knn"):
        rows = [row for emb, name in zip(opened, names)
                for row in report.probe_rows(emb, method, features=_features(feature), config=config, name=name)]
        metrics = sorted({m for emb in opened for m in report.probe_metric_names(emb)},
                         key=["balanced_accuracy", "accuracy", "qwk"].index)
        _print_probe(rows, metrics, report.METHOD_TITLES[method])
        click.echo("")
        result[method] = rows
    rows = [row for emb, name in zip(opened, names) for row in report.unsupervised_rows(emb, name=name)]
    click.echo(report.format_table(rows, report.UNSUPERVISED_COLUMNS, title="unsupervised"))
    result["unsupervised"] = rows
    out = Path(json_path) if json_path else Path(embs[0]).parent / "eval.json"
    click.echo(f"wrote {_write_json(out, result)}")


@eval_main.command("plots")
@click.argument("emb", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--store", default=None, help="The store the embeddings came from (cluster maps draw its regions).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Picture folder (default EMB/pictures, or the run folder for curves only).")
@click.option("--run", "runs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder(s) whose metrics.csv to draw as training curves.")
@click.option("--k", "ks", multiple=True, type=int, default=(3, 4), show_default=True, help="k-means cluster counts.")
@click.option("--max-slides", type=int, default=2, show_default=True, help="Cluster maps for this many slides.")
@click.option("--perplexity", type=float, default=30.0, show_default=True, help="t-SNE perplexity (clamped).")
def plots_cmd(emb: str | None, store: str | None, out_dir: str | None, runs: tuple[str, ...], ks: tuple[int, ...],
              max_slides: int, perplexity: float) -> None:
    """t-SNE of slide embeddings, k-means cluster maps over the store's regions, training curves."""
    from trainer.eval import pictures

    if emb is None and not runs:
        raise click.UsageError("give an embeddings folder, --run, or both")
    written: list[Path] = []
    notes: list[str] = []
    for run in runs:
        target = Path(out_dir) / f"{Path(run).name}-curves.png" if out_dir else Path(run) / "curves.png"
        try:
            path, _ = pictures.training_curves(Path(run) / "metrics.csv", target, title=Path(run).name)
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(f"--run {run}: {exc}") from None
        written.append(path)
    if emb is not None:
        embeddings = _open(emb)
        folder = Path(out_dir) if out_dir else embeddings.root / "pictures"
        labels = [None if not isinstance(v, str) else v for v in embeddings.table["label"]]
        if len(labels) >= 3:
            for encoder in embeddings.encoders:
                for feature in SLIDE_LEVEL_FEATURES:
                    path, n = pictures.tsne_plot(embeddings.slide_features(encoder, feature), labels,
                                                 folder / f"tsne-{encoder}-{feature}.png", perplexity=perplexity,
                                                 title=f"{embeddings.root.name} · {encoder} · mean {feature}")
                    written.append(path)
                    notes.extend(x for x in n if x not in notes)
        else:
            notes.append(f"no t-SNE: {len(labels)} slides (needs 3)")
        if store is not None:
            written.extend(_cluster_maps(embeddings, store, folder, ks, max_slides, notes))
        elif embeddings.has_regions:
            notes.append("no cluster maps: pass --store to draw them over the store's regions")
    for note in notes:
        click.echo(f"note: {note}")
    for path in written:
        click.echo(f"wrote {path}")


def _cluster_maps(embeddings, store: str, folder: Path, ks, max_slides: int, notes: list[str]) -> list[Path]:
    from trainer.data.tile_dataset import TileStoreDataset
    from trainer.eval import pictures

    if not embeddings.has_regions:
        notes.append("no cluster maps: the embeddings hold no per-region outputs (run pm-embed with --per-region)")
        return []
    slide_ids = embeddings.table["slide_id"].tolist()[:max_slides]
    try:
        dataset = TileStoreDataset(store, slide_ids=slide_ids, min_regions=0, max_regions=2**62)
    except (TileStoreError, ValueError) as exc:
        raise click.ClickException(f"--store {store}: {exc}") from None
    written = []
    encoder = embeddings.encoders[0]
    for index, slide_id in enumerate(dataset.slide_ids):
        part = embeddings.slide_part(encoder, slide_id)
        regions = dataset[index]["regions"].numpy()[part["region_index"]]
        for level, key in (("tokens", "region_tokens"), ("cls", "region_cls")):
            paths, n = pictures.save_cluster_maps(regions, part["coords"], part[key], folder,
                                                  name=f"clusters-{encoder}-{level}-{slide_id}", ks=ks)
            written.extend(paths)
            notes.extend(n)
    return written


@eval_main.command("predict")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Supervised or fine-tuned checkpoint (with a classification head).")
@click.option("--store", required=True, type=str)
@click.option("--split", default=None, help="Predict this split's slides (default: every slide).")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False), default=None,
              help="CSV of per-slide probabilities (default predictions-<split>.csv beside the checkpoint).")
@click.option("--regions-per-slide", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def predict_cmd(checkpoint: str, store: str, split: str | None, out_csv: str | None, regions_per_slide: int,
                device: str, no_progress: bool) -> None:
    """Per-slide class probabilities and predicted label (CSV) and the metrics table."""
    from trainer.eval.predict import predict_store

    try:
        frame, metrics = predict_store(checkpoint, store, split=split, regions_per_slide=regions_per_slide,
                                       device=_device(device), progress=not no_progress)
    except USER_ERRORS as exc:
        raise _fail(exc) from None
    out = Path(out_csv) if out_csv else Path(checkpoint).with_name(f"predictions-{split or 'all'}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    if metrics:
        names = [m for m in ("balanced_accuracy", "accuracy", "qwk") if m in metrics]
        row = {"embeddings": Path(checkpoint).name, "encoder": "head", "mean": metrics}
        click.echo(report.format_table([row], names, title=f"predict ({int(metrics['slides'])} labelled slides)"))
        _write_json(out.with_suffix(".json"), metrics)
    else:
        click.echo("no labelled slides: no metrics")
    click.echo(f"wrote {out}")


main = eval_main

if __name__ == "__main__":  # `torchrun -m trainer.eval.cli embed ...` and `python -m trainer.eval.cli ...`
    import sys

    if sys.argv[1:2] == ["embed"]:
        embed_main(sys.argv[2:])
    else:
        eval_main()
