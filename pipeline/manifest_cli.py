"""`pm-tiles manifest DIR`: print a manifest CSV for a folder of slides."""

from __future__ import annotations

import sys

import click

from pipeline.manifest import write_manifest


@click.command("manifest")
@click.argument("slide_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False), help="CSV of labels to join by slide id (e.g. PANDA's train.csv).")
@click.option("--id-column", help="Column of --labels holding the slide id (default: its first column).")
@click.option("--label-column", help="Column of --labels holding the label (default: its second column).")
@click.option("--case-column", help="Column of --labels holding the patient (case_id; splits group by it).")
def manifest_command(slide_dir: str, labels_csv: str | None, id_column: str | None, label_column: str | None,
                     case_column: str | None) -> None:
    """Write a manifest (CSV, to stdout) listing every slide file under SLIDE_DIR."""
    if case_column and not labels_csv:
        raise click.UsageError("--case-column needs --labels")
    try:
        table = write_manifest(slide_dir, labels_csv, id_column=id_column, label_column=label_column,
                               case_column=case_column)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    warning = table.attrs.get("label_warning")
    table.to_csv(sys.stdout, index=False)
    if warning:
        click.echo(warning, err=True)
