"""Data-loader throughput (``ldm bench data`` prints the table and writes JSON to checkpoints/bench/).

Measures decoded images per second of the ``ShardDataset`` pipeline (tar read → PNG decode → resize/crop
→ float batch), in-process (= one worker) and through a DataLoader with worker processes. Wall-clock
numbers depend on what else runs on the machine, so each row also reports images per CPU-second of
the decoding process (what one worker delivers when it has a core to itself) and the ratio to a
reference measured in the same run: bare PIL decoding of the same PNG bytes, the floor of any loader.
"""

from __future__ import annotations

import io
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ldm.data.shards import list_shards, read_shard
from ldm.data.webdata import EpochLoader, ShardDataset


def _reference_decode(urls: list[str], samples: int) -> dict[str, float]:
    payloads = []
    for url in urls:
        for _, files in read_shard(url):
            payloads.append(next(files[e] for e in ("png", "jpg", "jpeg", "webp") if e in files))
            if len(payloads) >= samples:
                break
        if len(payloads) >= samples:
            break
    wall, cpu = time.perf_counter(), time.process_time()
    for data in payloads:
        with Image.open(io.BytesIO(data)) as im:
            np.asarray(im.convert("RGB"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": len(payloads), "img_per_s": len(payloads) / wall, "img_per_cpu_s": len(payloads) / max(cpu, 1e-9)}


def measure(urls: list[str], resolution: int, batch_size: int, num_workers: int, samples: int,
            warmup: int = 2) -> dict[str, Any]:
    """Decode ``samples`` images (after ``warmup`` batches) through the loader; img/s wall and per CPU-s.

    CPU time is this process's when ``num_workers == 0``; with workers only the wall rate is meaningful.
    """
    total = samples + warmup * batch_size * max(1, num_workers)
    dataset = ShardDataset(urls, resolution, batch_size, shuffle_buffer=0, samples_per_epoch=total,
                           num_workers=num_workers)
    loader = EpochLoader(dataset, num_workers=num_workers)
    iterator = iter(loader)
    for _ in range(warmup * max(1, num_workers)):
        next(iterator)
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    for batch in iterator:
        count += len(batch["key"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = {"resolution": resolution, "batch_size": batch_size, "num_workers": num_workers, "images": count,
           "seconds": round(wall, 3), "img_per_s": count / wall}
    if num_workers == 0:
        row["img_per_cpu_s"] = count / max(cpu, 1e-9)
    else:
        row["img_per_s_per_worker"] = count / wall / num_workers
    return row


def _ensure_data(data_dir: str | None, log: Callable[[str], None] | None
                 ) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if data_dir and Path(data_dir).exists():
        return data_dir, None
    from ldm.data.shapes import build_shapes

    tmp = tempfile.TemporaryDirectory(prefix="ldm-bench-")
    if log:
        log(f"{data_dir or 'no data folder'}: not found; building 6,000 shapes samples in {tmp.name}")
    build_shapes(tmp.name, train=6000, val=0)
    return tmp.name, tmp


def benchmark(data_dir: str | None = "datasets/shapes", split: str = "train", samples: int = 10_000,
              batch_size: int = 64, resolutions: Sequence[int] = (32, 64), workers: Sequence[int] = (0, 2),
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Loader throughput at every (resolution, workers) beside bare PIL decoding; the JSON-ready result.

    ``data_dir`` is built (6,000 shapes samples in a temp folder, removed afterwards) when it does not exist."""
    data, tmp = _ensure_data(data_dir, log)
    try:
        urls = list_shards(data, split)
        reference = _reference_decode(urls, min(samples, 5000))
        rows = [measure(urls, r, batch_size, w, samples) for r in resolutions for w in workers]
    finally:
        if tmp is not None:
            tmp.cleanup()
    for row in rows:
        if "img_per_cpu_s" in row:
            row["vs_bare_pil_decode"] = row["img_per_cpu_s"] / reference["img_per_cpu_s"]
    return {"benchmark": "data_loader", "data_dir": data_dir, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                        "python": platform.python_version()},
            "reference_bare_pil_decode": reference, "rows": rows, "target_img_per_s_per_worker_32px": 2000}


def format_table(result: dict[str, Any]) -> str:
    """The reference line and one row per (resolution, workers) of a :func:`benchmark` result."""
    from ldm.table import format_table as table

    reference = result["reference_bare_pil_decode"]
    columns = [("resolution", "res", ""), ("num_workers", "workers", ""), ("images", "images", ""),
               ("img_per_s", "img/s", ".0f"),
               ("per_worker", "img/s/worker", lambda r: f"{r.get('img_per_s_per_worker', r['img_per_s']):.0f}"),
               ("img_per_cpu_s", "img/CPU-s", ".0f"), ("vs_bare_pil_decode", "vs PIL", ".2f")]
    return (f"bare PIL decode (reference): {reference['img_per_s']:.0f} img/s wall, "
            f"{reference['img_per_cpu_s']:.0f} img/CPU-s\n" + table(result["rows"], columns))
