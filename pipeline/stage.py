"""`pm-tiles stage SRC LOCAL`: copy a shared store to local disk, verifying, resumable.

Each slide of the source table is streamed key by key (4 MiB blocks) into a temporary
group of the local store and hashed on the way; a slide whose bytes do not match the
checksums recorded at write time is not committed and is reported. With another codec
(`--codec none`: memory-mapped reads from a compressed shared store) the verified copy is
decoded region by region and rewritten through `write_slide`, then deleted. Each staged
slide commits like a built one (rename, table in batches), and its group records where
it came from (`staged_from`), so a re-run skips slides already staged from the same
content and a crash loses nothing that `reconcile` cannot restore.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.storage import LocalStore

from pipeline.locking import build_lock
from pipeline.schema.checksums import ArrayHasher, array_keys, slide_checksum
from pipeline.schema.codecs import codec_settings
from pipeline.schema.commit import commit_group, group_attributes, reconcile, temp_group_name
from pipeline.schema.errors import ChecksumError, TileStoreError
from pipeline.schema.format import ARRAY_NAMES, COORDS, FOREGROUND, ORIGIN, REGIONS, SLIDES_GROUP, TISSUE_GEOJSON, StoreAttrs
from pipeline.schema.reader import TileStore, open_store
from pipeline.store_writer import check_store_folder, create_store, fsync_tree, write_group_metadata, write_slide
from pipeline.table_batch import BatchedTable

STAGED_FROM = "staged_from"  # slide group attribute: {"url", "checksum"} of the source slide
_DECODE_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class StageSummary:
    """copied: slides staged now; skipped: already staged from the same content;
    failed: slide id → reason (corrupt or unreadable at the source); bytes_read: source bytes."""

    source: str
    local: str
    copied: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        rate = self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0
        lines = [f"staged {self.source} → {self.local}: {len(self.copied)} copied, {len(self.skipped)} already "
                 f"staged, {len(self.failed)} failed; {self.bytes_read / 1e6:.1f} MB read in {self.seconds:.1f} s "
                 f"({rate:.0f} MB/s)"]
        lines += [f"  FAILED {slide_id}: {why}" for slide_id, why in sorted(self.failed.items())]
        return "\n".join(lines)


def stage_store(source_url: str | os.PathLike, local: str | os.PathLike, *, codec: str | None = None,
                codec_options: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None,
                progress: bool = False) -> StageSummary:
    """Stage the store at `source_url` into the local folder `local` (see module docstring).

    codec: the local copy's region codec (None: the source's). Raises when the source is
    not a readable tile store, or `local` holds a store with other settings.
    """
    started = time.perf_counter()
    source = open_store(source_url, storage_options=storage_options)
    root = Path(local).absolute()
    check_store_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    codec_attr = codec_settings(codec, **(codec_options or {})) if codec is not None else dict(source.attrs.codec)
    wanted = StoreAttrs.from_json({**source.attrs.to_json(), "codec": codec_attr, "created": ""})
    copied, skipped, failed = [], [], {}
    counted = [0]
    with build_lock(root) as writer:
        attrs = create_store(root, wanted)
        table, _ = reconcile(root)
        batched = BatchedTable(root, table)
        transcode = attrs.codec != source.attrs.codec
        try:
            for slide_id in tqdm(source.slide_ids, unit="slide", desc="staging", disable=not progress):
                record = source.records[slide_id]
                if _already_staged(root, batched, slide_id, record.checksum):
                    skipped.append(slide_id)
                    continue
                try:
                    checksum = _stage_slide(source, root, slide_id, transcode=transcode, build_id=writer.build_id,
                                            counted=counted)
                except (ChecksumError, OSError, ValueError, TileStoreError) as error:
                    failed[slide_id] = f"{type(error).__name__}: {error}"
                    continue
                batched.put_slide(dataclasses.replace(record, checksum=checksum))
                copied.append(slide_id)
        finally:
            batched.flush()
    return StageSummary(source=source.url, local=str(root), copied=tuple(copied), skipped=tuple(skipped),
                        failed=failed, bytes_read=counted[0], seconds=time.perf_counter() - started)


def _already_staged(root: Path, batched: BatchedTable, slide_id: str, source_checksum: str) -> bool:
    if slide_id not in batched.slides:
        return False
    try:
        staged = group_attributes(root / SLIDES_GROUP / slide_id).get(STAGED_FROM) or {}
    except (OSError, ValueError):
        return False
    return staged.get("checksum") == source_checksum


def _stage_slide(source: TileStore, root: Path, slide_id: str, *, transcode: bool, build_id: str,
                 counted: list[int]) -> str:
    """Copy one slide, verified; returns its local content checksum."""
    attrs = source.slide_attrs(slide_id)
    recorded = attrs.get("checksums") or {}
    temp = temp_group_name(slide_id)
    group = root / SLIDES_GROUP / temp
    group.mkdir()
    try:
        checksums = {name: _copy_array(source, slide_id, name, group / name, counted) for name in ARRAY_NAMES}
        for name in ARRAY_NAMES:
            if checksums[name] != recorded.get(name):
                raise ChecksumError(f"array {name!r} does not match its recorded checksum at the source")
        if slide_checksum(checksums) != source.records[slide_id].checksum:
            raise ChecksumError("the content checksum differs from the source's slide table")
        tissue = source.key_blocks(f"{SLIDES_GROUP}/{slide_id}/{TISSUE_GEOJSON}")
        tissue_bytes = b"".join(tissue[1]) if tissue is not None else None
        staged_from = {"url": source.url, "checksum": source.records[slide_id].checksum}
        if transcode:
            return _rewrite(root, temp, slide_id, attrs, tissue_bytes, staged_from, build_id)
        if tissue_bytes is not None:
            (group / TISSUE_GEOJSON).write_bytes(tissue_bytes)
        write_group_metadata(group, {**attrs, STAGED_FROM: staged_from})
        fsync_tree(group)
        commit_group(root, temp, slide_id)
        return source.records[slide_id].checksum
    finally:
        shutil.rmtree(group, ignore_errors=True)


def _copy_array(source: TileStore, slide_id: str, name: str, folder: Path, counted: list[int]) -> str:
    """Stream one array's stored keys into `folder`, hashing them as the checksum defines."""
    found_metadata = source.key_blocks(f"{SLIDES_GROUP}/{slide_id}/{name}/zarr.json")
    if found_metadata is None:
        raise ChecksumError(f"array {name!r} is missing at the source")
    metadata_bytes = b"".join(found_metadata[1])
    hasher = ArrayHasher()
    for key in array_keys(json.loads(metadata_bytes)):
        if key == "zarr.json":
            found = len(metadata_bytes), [metadata_bytes]
        else:
            found = source.key_blocks(f"{SLIDES_GROUP}/{slide_id}/{name}/{key}")
        if found is None:
            continue
        size, blocks = found
        target = folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher.begin(key, size)
        with open(target, "wb") as handle:
            for block in blocks:
                handle.write(block)
                hasher.update(block)
                counted[0] += len(block)
        hasher.end()
    return hasher.hexdigest()


def _rewrite(root: Path, temp: str, slide_id: str, attrs: dict[str, Any], tissue: bytes | None,
             staged_from: dict[str, str], build_id: str) -> str:
    """Decode the verified copy `slides/<temp>` region by region into a new group in the
    local store's codec (committed by `write_slide`)."""
    store = LocalStore(root, read_only=True)
    base = f"{SLIDES_GROUP}/{temp}"
    regions = zarr.open_array(store, path=f"{base}/{REGIONS}", mode="r")
    small = {name: zarr.open_array(store, path=f"{base}/{name}", mode="r")[...] for name in (COORDS, ORIGIN, FOREGROUND)}
    n = int(regions.shape[0])

    def batches():
        for start in range(0, n, _DECODE_BATCH):
            yield np.asarray(regions[start:start + _DECODE_BATCH])

    keep = {k: v for k, v in attrs.items() if k not in ("slide_id", "n_regions", "checksums", "checksum")}
    written = write_slide(root, slide_id, regions=batches(), n_regions=n, coords=small[COORDS],
                          origin=small[ORIGIN], foreground=small[FOREGROUND],
                          attrs={**keep, STAGED_FROM: staged_from},
                          files={TISSUE_GEOJSON: tissue} if tissue is not None else None, build_id=build_id)
    return written["checksum"]
