"""The ``folder`` dataset: your own images + captions → webdataset shards.

Sources:

* a folder (searched recursively) of images with same-name captions: ``cat.jpg`` + ``cat.txt``;
* a ``.csv`` / ``.tsv`` (or ``.parquet`` when pyarrow is installed) with a path column and a caption
  column; relative paths are relative to the table's folder. URLs are not downloaded (skipped).

Every image is decoded fully (so truncated files are caught), optionally resized (``size``: shorter side
to ``size`` + centre crop; ``max_side``: downscale so the longer side fits), and deduplicated by the
SHA-256 of its file bytes (the first path in sorted order is kept). Skipped files are reported by
reason in ``report.json`` and counted in ``info.json``. The train/val assignment follows the content
hash, so it is stable when files are added.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.data.shards import clear_split, plan_shards, run_parallel, shard_name, write_info, write_shard
from ldm.io import write_json

READABLE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
Entry = tuple[str, str | None]  # (image path, caption or None when it has none)


def _caption_file(image: Path) -> str | None:
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None


def entries_from_folder(folder: Path) -> list[Entry]:
    """Every image under ``folder`` (sorted) with the text of its same-name ``.txt`` (or None)."""
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
    """RGB (transparent areas over white), then resize: shorter side to ``size`` + centre crop, or
    downscale so the longer side is at most ``max_side``."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    w, h = image.size
    if size is not None:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    return image


def _check(entry: Entry) -> tuple[str, str | None]:
    """(sha256, None) for a readable image, ("", reason) otherwise."""
    path, _ = entry
    if "://" in path:
        return "", "url (not downloaded; give local files)"
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "", "empty image"
    except FileNotFoundError:
        return "", "file not found"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return "", f"unreadable image ({type(e).__name__})"
    return hashlib.sha256(data).hexdigest(), None


def _encode(image: Image.Image, fmt: str | None) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
        return "jpg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


KEEP_AS_IS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def _write(task: tuple[str, list[dict[str, Any]], int | None, int | None]) -> int:
    path, items, size, max_side = task
    samples = []
    for item in items:
        data = Path(item["path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fits = size is None and (max_side is None or max(im.size) <= max_side)
            if fits and im.mode == "RGB" and im.format in KEEP_AS_IS:  # no re-encoding loss
                ext, width, height = KEEP_AS_IS[im.format], im.width, im.height
            else:
                image = transform(im, size, max_side)
                ext, data = _encode(image, im.format)
                width, height = image.size
        meta = {"source_path": item["rel"], "sha256": item["sha256"], "width": width, "height": height}
        files = {ext: data, "txt": (item["caption"] or "").encode("utf-8"),
                 "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
        samples.append((item["key"], files))
    return write_shard(path, samples)


def build_folder(src: str | Path, out_dir: str | Path, size: int | None = None, max_side: int | None = None,
                 val_fraction: float = 0.05, path_column: str = "path", caption_column: str = "caption",
                 require_caption: bool = True, seed: int = 0, shard_size: int = 1000,
                 processes: int | None = None, license: str = "unknown", source: str | None = None
                 ) -> dict[str, Any]:
    """Convert a folder or table of images + captions to ``out_dir/{train,val}/*.tar`` + info.json.

    Returns the info dict; skipped files (unreadable, missing caption, duplicate, URL) are listed by
    reason in ``out_dir/report.json``.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--src {src} does not exist")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    entries = entries_from_folder(src) if src.is_dir() else entries_from_table(src, path_column, caption_column)
    if not entries:
        raise ValueError(f"no images found in {src} (looked for {', '.join(READABLE_EXTS)})")
    root = src if src.is_dir() else src.parent
    skipped: dict[str, list[str]] = defaultdict(list)
    checks = run_parallel(_check, entries, processes)
    kept, seen = [], {}
    for (path, caption), (digest, problem) in zip(entries, checks):
        rel = os.path.relpath(path, root) if "://" not in path else path
        if problem:
            skipped[problem].append(rel)
        elif require_caption and not caption:
            skipped["missing caption (.txt or caption column)"].append(rel)
        elif digest in seen:
            skipped["duplicate content"].append(f"{rel} (same as {seen[digest]})")
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
        tasks += [(str(out / split / shard_name(split, k)), items[s:e], size, max_side)
                  for k, (s, e) in enumerate(ranges)]
    run_parallel(_write, tasks, processes)
    report = {"skipped": {reason: sorted(paths) for reason, paths in sorted(skipped.items())},
              "skipped_counts": {reason: len(paths) for reason, paths in sorted(skipped.items())}}
    write_json(out / "report.json", report)
    info = {"name": "folder", "source": source or str(src), "license": license, "resolution": size,
            "max_side": max_side, "counts": {k: len(v) for k, v in splits.items()}, "shards": shards,
            "skipped": report["skipped_counts"], "seed": seed}
    write_info(out, info)
    if skipped:
        print(f"skipped {sum(len(v) for v in skipped.values())} of {len(entries)} files: "
              + "; ".join(f"{k}: {n}" for k, n in report["skipped_counts"].items())
              + f" (paths in {out / 'report.json'})")
    return info
