"""The ``folder`` dataset: your own images + captions → webdataset shards.

Sources:

* a folder (searched recursively) of images with same-name captions: ``cat.jpg`` + ``cat.txt``;
* a ``.csv`` / ``.tsv`` (or ``.parquet`` when pyarrow is installed) with a path column and a caption
  column; relative paths are relative to the table's folder. URLs are not downloaded (skipped).

Every image is decoded fully with ``ldm.data.images.decode_rgb`` (the decoding the loader uses: 16-bit,
palette and CMYK modes, EXIF orientation, transparency composited on ``background``, the ``max_pixels``
limit), so truncated or unusable files are caught here; captions are strict UTF-8. Images are optionally
resized (``size``: shorter side to ``size`` + centre crop, exactly as the loader does; ``max_side``:
downscale so the longer side fits; ``buckets``: keep the aspect ratio, downscaled to just cover the image's
aspect-ratio bucket of ``ldm.data.buckets``, for bucketed training) and deduplicated by the SHA-256 of their file bytes
(the first path in sorted order is kept). An opaque RGB PNG/JPEG/WebP that needs no resizing is stored as is (no
re-encoding loss; the loader applies its EXIF orientation), anything else as the decoded RGB pixels. Skipped files are
listed by reason (the keys of ``SKIP_REASONS``) in ``report.json`` and counted in ``info.json``. The
train/val assignment follows the content hash, so it is stable when files are added.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.data.buckets import BucketSpec, assign_bucket, cover_crop, cover_scale, size_key
from ldm.data.images import (
    DECODE_REASONS,
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_caption,
    decode_rgb,
    fit_within,
    open_image,
    parse_background,
    resize_crop,
)
from ldm.data.shards import clear_split, plan_shards, run_parallel, shard_name, write_info, write_shard
from ldm.io import write_json

READABLE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# (image path, caption: text, the raw bytes of a .txt file (decoded strictly later), or None when it has none)
Entry = tuple[str, str | bytes | None]
SKIP_REASONS: dict[str, str] = {
    "url": "a URL (not downloaded; give local files)",
    "file_not_found": "the file does not exist",
    **DECODE_REASONS,
    "missing_caption": "no caption (.txt or caption column), or an empty one",
    "too_small": "with --buckets: would need more than max_upscale enlargement to cover its bucket",
    "duplicate": "the same file content as an earlier path",
}


def _caption_file(image: Path) -> bytes | None:
    txt = image.with_suffix(".txt")
    return txt.read_bytes() if txt.is_file() else None


def entries_from_folder(folder: Path) -> list[Entry]:
    """Every image under ``folder`` (sorted) with the bytes of its same-name ``.txt`` (or None)."""
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_EXTS)
    return [(str(p), _caption_file(p)) for p in images]


def entries_from_table(table: Path, path_column: str = "path", caption_column: str = "caption") -> list[Entry]:
    """(path, caption) rows of a CSV/TSV/parquet file; relative paths resolve against the table's folder."""
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError(f"reading {table} needs pyarrow: `pip install pyarrow`, or export the table "
                               "to CSV/TSV") from e
        rows = pq.read_table(table).to_pylist()
        columns = list(rows[0]) if rows else []
    elif suffix in (".csv", ".tsv"):
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            columns = reader.fieldnames or []
    else:
        raise ValueError(f"--src {table}: expected a folder or a .csv/.tsv/.parquet table")
    missing = [c for c in (path_column, caption_column) if c not in columns]
    if missing:
        raise ValueError(f"{table} has no column {missing} (columns: {columns}); "
                         f"set --path-column/--caption-column")
    out = []
    for row in rows:
        path = str(row[path_column] or "")
        if path and "://" not in path and not os.path.isabs(path):
            path = str(table.parent / path)
        caption = row[caption_column]
        out.append((path, None if caption is None else str(caption).strip()))
    return out


def transform(image: Image.Image, size: int | None, max_side: int | None) -> Image.Image:
    """Resize a decoded RGB image: shorter side to ``size`` + centre crop (the loader's ``resize_crop``), or
    downscale so the longer side is at most ``max_side``; neither: unchanged."""
    if size is not None:
        return resize_crop(image, size)
    if max_side is not None:
        return fit_within(image, max_side)
    return image


# (background, max_pixels, size, buckets)
Options = tuple[tuple[int, int, int], int | None, int | None, BucketSpec | None]


def _check(task: tuple[Entry, Options]) -> tuple[str, str | None, str | None]:
    """(sha256, caption, None) for a usable image, ("", None, reason) otherwise (a key of SKIP_REASONS)."""
    (path, caption), (background, max_pixels, size, buckets) = task
    if "://" in path:
        return "", None, "url"
    try:
        data = Path(path).read_bytes()
        image = decode_rgb(data, background, max_pixels, min_side=None if buckets else size)
        text = decode_caption(caption) if isinstance(caption, bytes) else caption
    except FileNotFoundError:
        return "", None, "file_not_found"
    except DecodeError as e:
        return "", None, e.reason
    if buckets is not None:
        choices = buckets.buckets()
        if cover_scale(image.size, choices[assign_bucket(image.size, choices)]) > buckets.max_upscale:
            return "", None, "too_small"
    return hashlib.sha256(data).hexdigest(), text, None


def fit_bucket(image: Image.Image, buckets: BucketSpec) -> tuple[Image.Image, list[int]]:
    """Keep the aspect ratio; downscale (bicubic) to just cover the image's bucket, never enlarge (the loader
    crops, and enlarges by at most ``max_upscale``). Returns (image, bucket [width, height])."""
    choices = buckets.buckets()
    bucket = choices[assign_bucket(image.size, choices)]
    (nw, nh), _ = cover_crop(image.size, bucket)
    if nw < image.size[0]:
        image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    return image, list(bucket)


def _encode(image: Image.Image, fmt: str | None) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
        return "jpg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


KEEP_AS_IS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def _write(task: tuple[str, list[dict[str, Any]], int | None, int | None, Options]) -> list[list[int]]:
    """Write one shard; returns the stored images' [width, height]."""
    path, items, size, max_side, (background, max_pixels, _, buckets) = task
    samples, sizes = [], []
    for item in items:
        data = Path(item["path"]).read_bytes()
        header = open_image(data, max_pixels=None)
        fmt, plain_rgb = header.format, header.mode == "RGB" and "transparency" not in header.info
        image = decode_rgb(data, background, max_pixels, min_side=None if buckets else size)
        original = image.size
        bucket = None
        if buckets is not None:
            image, bucket = fit_bucket(image, buckets)
        fits = image.size == original and (buckets is not None or size is None) and (
            max_side is None or max(image.size) <= max_side)
        if fits and plain_rgb and fmt in KEEP_AS_IS:  # no re-encoding loss
            ext = KEEP_AS_IS[fmt]
        else:
            if buckets is None:
                image = transform(image, size, max_side)
            ext, data = _encode(image, fmt)
        width, height = image.size
        meta = {"source_path": item["rel"], "sha256": item["sha256"], "width": width, "height": height,
                "original_width": original[0], "original_height": original[1]}
        if bucket is not None:
            meta["bucket"] = bucket
        files = {ext: data, "txt": (item["caption"] or "").encode("utf-8"),
                 "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
        samples.append((item["key"], files))
        sizes.append([width, height])
    write_shard(path, samples)
    return sizes


def build_folder(src: str | Path, out_dir: str | Path, size: int | None = None, max_side: int | None = None,
                 val_fraction: float = 0.05, path_column: str = "path", caption_column: str = "caption",
                 require_caption: bool = True, seed: int = 0, shard_size: int = 1000,
                 processes: int | None = None, license: str = "unknown", source: str | None = None,
                 background: str | tuple[int, int, int] = DEFAULT_BACKGROUND,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, buckets: BucketSpec | None = None) -> dict[str, Any]:
    """Convert a folder or table of images + captions to ``out_dir/{train,val}/*.tar`` + info.json.

    ``background``: colour transparent images are composited on (the loader's default white);
    ``max_pixels``: larger images are skipped (``too_many_pixels``) without being decoded;
    ``buckets``: keep each image's aspect ratio, downscaled to just cover its aspect-ratio bucket (``size`` is
    ignored; images that would need more than ``max_upscale`` enlargement are skipped as ``too_small``), and
    record the spec in info.json for ``ldm cache --buckets`` / ``WebDataModule(buckets=...)``.
    Every sample's json holds its stored ``width``/``height`` and ``original_width``/``original_height``;
    info.json's ``sizes`` counts the stored sizes per split (``"WxH": n``), which the bucketed loader reads.
    Returns the info dict; skipped files are listed by reason (keys of ``SKIP_REASONS``) in
    ``out_dir/report.json`` and counted in info.json's ``skipped``.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--src {src} does not exist")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    options: Options = (parse_background(background), max_pixels, size, buckets)
    entries = entries_from_folder(src) if src.is_dir() else entries_from_table(src, path_column, caption_column)
    if not entries:
        raise ValueError(f"no images found in {src} (looked for {', '.join(READABLE_EXTS)})")
    root = src if src.is_dir() else src.parent
    skipped: dict[str, list[str]] = defaultdict(list)
    checks = run_parallel(_check, [(entry, options) for entry in entries], processes)
    kept, seen = [], {}
    for (path, _), (digest, caption, problem) in zip(entries, checks):
        rel = os.path.relpath(path, root) if "://" not in path else path
        if problem:
            skipped[problem].append(rel)
        elif require_caption and not caption:
            skipped["missing_caption"].append(rel)
        elif digest in seen:
            skipped["duplicate"].append(f"{rel} (same as {seen[digest]})")
        else:
            seen[digest] = rel
            kept.append({"path": path, "rel": rel, "caption": caption, "sha256": digest})
    if not kept:
        raise ValueError(f"every file in {src} was skipped: { {k: len(v) for k, v in skipped.items()} }")
    # val membership from the content hash (stable when files are added), salted by the seed
    def unit(item: dict[str, Any]) -> float:
        return int(hashlib.sha256(f"{seed}/{item['sha256']}".encode()).hexdigest()[:12], 16) / 16 ** 12
    val = [it for it in kept if unit(it) < val_fraction]
    if val_fraction > 0 and not val and len(kept) >= 2:
        val = [min(kept, key=unit)]
    val_ids = {id(it) for it in val}
    splits = {"train": [it for it in kept if id(it) not in val_ids], "val": val}
    out = Path(out_dir)
    tasks, shards = [], {}
    for split, items in splits.items():
        clear_split(out, split)
        for i, it in enumerate(items):
            it["key"] = f"{split}_{i:08d}"
        ranges = plan_shards(len(items), shard_size)
        shards[split] = {shard_name(split, k): e - s for k, (s, e) in enumerate(ranges)}
        tasks += [(str(out / split / shard_name(split, k)), items[s:e], size, max_side, options)
                  for k, (s, e) in enumerate(ranges)]
    written = run_parallel(_write, tasks, processes)
    sizes: dict[str, dict[str, int]] = {split: {} for split in splits}
    for task, shard_sizes in zip(tasks, written):
        split = Path(task[0]).parent.name
        for w, h in shard_sizes:
            sizes[split][size_key((w, h))] = sizes[split].get(size_key((w, h)), 0) + 1
    report = {"skipped": {reason: sorted(paths) for reason, paths in sorted(skipped.items())},
              "skipped_counts": {reason: len(paths) for reason, paths in sorted(skipped.items())},
              "reasons": {reason: SKIP_REASONS[reason] for reason in sorted(skipped)}}
    write_json(out / "report.json", report)
    info = {"name": "folder", "source": source or str(src), "license": license, "resolution": size,
            "max_side": max_side, "background": list(options[0]), "max_pixels": max_pixels,
            "counts": {k: len(v) for k, v in splits.items()}, "shards": shards,
            "skipped": report["skipped_counts"], "seed": seed,
            "sizes": {split: dict(sorted(v.items())) for split, v in sizes.items()},
            "buckets": None if buckets is None else {**dataclasses.asdict(buckets),
                                                     "list": [list(b) for b in buckets.buckets()]}}
    write_info(out, info)
    if skipped:
        print(f"skipped {sum(len(v) for v in skipped.values())} of {len(entries)} files: "
              + "; ".join(f"{k}: {n}" for k, n in report["skipped_counts"].items())
              + f" (paths in {out / 'report.json'})")
    return info
