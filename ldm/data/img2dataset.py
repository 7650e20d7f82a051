"""An img2dataset download as it comes: a flat folder of shards, its own counts, a validation set carved from it.

img2dataset (``--output_format webdataset``) writes ``OUT/00000.tar`` … with, beside each shard, ``00000.parquet``
(one row per URL: ``key``, ``status``, ``width``, ``height``, ``original_width``, …) and ``00000_stats.json``
(``count``, ``successes``, ``failed_to_download``, …), and no ``train/``/``val/`` folders or ``info.json``.

* :func:`carve_validation`: the validation set of a flat folder. With two shards or more, whole shards are held
  out: those whose seeded name hash (a uniform number in [0, 1)) is below ``fraction`` — so adding shards never
  moves an old one — or, when none is, the one with the smallest hash; with one shard, samples are (by a seeded
  hash of their keys). The choice is returned as a record
  that ``WebDataModule`` prints and saves in its checkpoints.
* :func:`shard_counts`: samples per shard, from ``info.json`` when there is one, else the shard's
  ``*_stats.json`` (``successes``), else its parquet (rows with ``status == "success"``, when pyarrow is
  installed), else by reading the tar's member headers (local files; no image is decoded). With counts, DDP
  epochs have a known length and ``EpochLoader`` keeps the ranks in step.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, Sequence

from ldm.data.shards import SHARD_PATTERN, split_key

HOLDOUT_SALT = "ldm-val"


def unit_hash(seed: int, text: str) -> float:
    """A uniform number in [0, 1) from (seed, text): stable across runs, machines and Python versions."""
    return int(hashlib.sha256(f"{HOLDOUT_SALT}/{seed}/{text}".encode()).hexdigest()[:12], 16) / 16 ** 12


def is_flat_folder(data_dir: str | os.PathLike, train_split: str = "train") -> bool:
    """A folder with shards at its top and no ``train_split/`` sub-folder (img2dataset's own layout)."""
    path = Path(data_dir)
    return path.is_dir() and not (path / train_split).is_dir() and any(path.glob(SHARD_PATTERN))


def _name(url: str) -> str:
    return url.replace("\\", "/").rpartition("/")[2]


def carve_validation(urls: Sequence[str], fraction: float, seed: int = 0
                     ) -> tuple[list[str], list[str], dict[str, Any]]:
    """(train urls, val urls, record) for a flat folder (module docstring). With one shard both lists hold it and
    the record's ``kind`` is ``"samples"``: ``ShardDataset(holdout=...)`` then keeps each split's keys."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) to carve a validation set, got {fraction}")
    urls = sorted(urls)
    if len(urls) >= 2:
        ranked = sorted(urls, key=lambda u: (unit_hash(seed, _name(u)), u))
        val = [u for u in ranked if unit_hash(seed, _name(u)) < fraction][:len(urls) - 1] or ranked[:1]
        val = sorted(val)
        train = [u for u in urls if u not in set(val)]
        record = {"kind": "shards", "val_shards": [_name(u) for u in val], "fraction": fraction, "seed": seed}
        return train, val, record
    record = {"kind": "samples", "fraction": fraction, "seed": seed, "rule": f"sha256('{HOLDOUT_SALT}/"
              f"{seed}/<key>') / 16^12 < {fraction} (first 12 hex digits)"}
    return list(urls), list(urls), record


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether a sample key belongs to the carved validation set (the ``"samples"`` kind)."""
    return unit_hash(seed, key) < fraction


def _stats_count(url: str) -> int | None:
    stem = url[:-len(".tar")] if url.endswith(".tar") else None
    if stem is None:
        return None
    stats = Path(stem + "_stats.json")
    if stats.is_file():
        try:
            value = json.loads(stats.read_text()).get("successes")
        except (OSError, ValueError):
            return None
        return int(value) if isinstance(value, int) and value >= 0 else None
    parquet = Path(stem + ".parquet")
    if parquet.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return None
        try:
            table = pq.read_table(parquet, columns=["status"])
        except Exception:  # noqa: BLE001 - an unreadable table: fall back to the tar itself
            return None
        return sum(1 for s in table.column("status").to_pylist() if s == "success")
    return None


def count_tar_samples(url: str) -> int | None:
    """Samples in a local tar shard from its member headers alone (None for remote or unreadable shards)."""
    if "://" in url or url.startswith("pipe:") or not url.endswith(".tar") or not os.path.isfile(url):
        return None
    from ldm.data.shards import _octal

    keys, pos = set(), 0
    try:
        with open(url, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return 0
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                end = len(data)
                while pos + 512 <= end:
                    header = data[pos:pos + 512]
                    if not any(header):
                        break
                    size, kind = _octal(header[124:136]), header[156:157]
                    name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if header[257:262] == b"ustar" and prefix:
                        name = prefix.decode("utf-8", errors="replace") + "/" + name
                    if kind in (b"0", b"\0", b"7"):
                        key, _ = split_key(name)
                        if not key.rpartition("/")[2].startswith("__"):
                            keys.add(key)
                    pos += 512 + (size + 511) // 512 * 512
    except (OSError, ValueError):
        return None
    return len(keys)


def shard_counts(urls: Sequence[str], info: dict[str, Any], split: str | None) -> tuple[dict[str, int], str]:
    """({url: samples}, source) for every shard whose count can be found; source names where they came from
    (``info.json``, ``img2dataset stats``, ``tar headers``, or a mix)."""
    per_shard = (info.get("shards") or {}).get(split) or {}
    counts, sources = {}, set()
    for url in urls:
        name = _name(url)
        if name in per_shard:
            counts[url], source = int(per_shard[name]), "info.json"
        elif (n := _stats_count(url)) is not None:
            counts[url], source = n, "img2dataset stats"
        elif (n := count_tar_samples(url)) is not None:
            counts[url], source = n, "tar headers"
        else:
            continue
        sources.add(source)
    return counts, " + ".join(sorted(sources)) or "none"
