"""Data-loader throughput: ``python -m ldm.data.bench`` prints a table and writes JSON to checkpoints/bench/.

Measures decoded images per second of the ``ShardDataset`` pipeline (tar read → PNG decode → resize/crop
→ float batch), in-process (= one worker) and through a DataLoader with worker processes. Wall-clock
numbers depend on what else runs on the machine, so each row also reports images per CPU-second of
the decoding process (what one worker delivers when it has a core to itself) and the ratio to a
reference measured in the same run: bare PIL decoding of the same PNG bytes, the floor of any loader.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.shards import list_shards, read_shard
from ldm.data.webdata import EpochLoader, ShardDataset
from ldm.io import write_json


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


def _ensure_data(data_dir: str | None) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if data_dir and Path(data_dir).exists():
        return data_dir, None
    from ldm.data.shapes import build_shapes

    tmp = tempfile.TemporaryDirectory(prefix="ldm-bench-")
    print(f"{data_dir or 'no --data-dir'}: not found; building 6,000 shapes samples in {tmp.name}")
    build_shapes(tmp.name, train=6000, val=0)
    return tmp.name, tmp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.data.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="datasets/shapes", help="dataset folder (built if missing)")
    parser.add_argument("--split", default="train", help="split to read")
    parser.add_argument("--samples", type=int, default=10_000, help="images decoded per measurement")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64], help="output resolutions")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--out", default="checkpoints/bench/data_loader.json", help="JSON result file")
    args = parser.parse_args(argv)
    data_dir, tmp = _ensure_data(args.data_dir)
    try:
        urls = list_shards(data_dir, args.split)
        reference = _reference_decode(urls, min(args.samples, 5000))
        rows = [measure(urls, r, args.batch_size, w, args.samples) for r in args.resolutions for w in args.workers]
    finally:
        if tmp is not None:
            tmp.cleanup()
    for row in rows:
        if "img_per_cpu_s" in row:
            row["vs_bare_pil_decode"] = row["img_per_cpu_s"] / reference["img_per_cpu_s"]
    print(f"bare PIL decode (reference): {reference['img_per_s']:.0f} img/s wall, "
          f"{reference['img_per_cpu_s']:.0f} img/CPU-s")
    print(f"{'res':>4} {'workers':>7} {'images':>7} {'img/s':>8} {'img/s/worker':>12} {'img/CPU-s':>9} {'vs PIL':>6}")
    for row in rows:
        per_worker = row.get("img_per_s_per_worker", row["img_per_s"])
        cpu = f"{row['img_per_cpu_s']:.0f}" if "img_per_cpu_s" in row else "-"
        ratio = f"{row['vs_bare_pil_decode']:.2f}" if "vs_bare_pil_decode" in row else "-"
        print(f"{row['resolution']:>4} {row['num_workers']:>7} {row['images']:>7} {row['img_per_s']:>8.0f} "
              f"{per_worker:>12.0f} {cpu:>9} {ratio:>6}")
    result = {"benchmark": "data_loader", "data_dir": args.data_dir, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                          "python": platform.python_version()},
              "reference_bare_pil_decode": reference, "rows": rows, "target_img_per_s_per_worker_32px": 2000}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
