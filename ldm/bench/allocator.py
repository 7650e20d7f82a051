"""The allocator switch of ``ldm bench``'s fastpath group: ``ldm.allocator.keep_freed_memory`` on vs off.

The setting belongs to the whole process and cannot be undone inside it, so each side runs in its own child
process (``python -m ldm.bench.allocator``), the two kinds alternating (off, on, off, on, ...) so that a slow phase
of a shared machine falls on both. Every child builds the shapes U-Net of the denoiser rows at the same seed and
times its forward (inference) and training step; the parent pools the children's round times per side and reports
medians, with the minor page faults per call (memory the kernel had to hand over, zeroed, during the call) and the
CPU time the kernel spent per call (``ru_stime``: what the faults cost, steadier than wall time between processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any


def _child(args: argparse.Namespace) -> dict[str, Any]:
    if args.on:
        from ldm.allocator import keep_freed_memory

        keep_freed_memory()
    from ldm.bench.measure import interleaved
    from ldm.bench.suite import Contender, Settings, denoiser_configs, make_batch, our_unet, ours_call

    s = Settings(batch=args.batch, tiny=args.tiny)
    config, size = denoiser_configs(s)["shapes"]
    ours = our_unet(config)
    c = Contender(ours, ours_call, make_batch(config, s.batch, size, s.tokens, "cpu"))
    result = {}
    for kind, fn in (("forward", c.forward), ("train step", c.train)):
        for _ in range(args.warmup):
            fn()
        before = resource.getrusage(resource.RUSAGE_SELF)
        times = interleaved({"x": fn}, args.rounds, 0)["x"]
        after = resource.getrusage(resource.RUSAGE_SELF)
        result[kind] = {"wall_rounds": times["wall_rounds"], "cpu_s": times["cpu_s"],
                        "sys_s": (after.ru_stime - before.ru_stime) / args.rounds,
                        "faults_per_call": (after.ru_minflt - before.ru_minflt) / args.rounds}
    return result


def allocator_rows(batch: int, rounds: int, warmup: int, pairs: int, tiny: bool = False) -> list[dict[str, Any]]:
    """Two rows (forward and training step at the shapes config): img/s with the allocator keeping freed memory
    (on) vs the C library's defaults (off), ``pairs`` child processes per side, alternating."""
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(pairs):
        for side in ("off", "on"):
            env = {**os.environ, "LDM_ALLOCATOR": "default" if side == "on" else "system"}
            cmd = [sys.executable, "-m", "ldm.bench.allocator", "--batch", str(batch), "--rounds", str(rounds),
                   "--warmup", str(warmup), *(["--on"] if side == "on" else []), *(["--tiny"] if tiny else [])]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for kind in ("forward", "train step"):
        wall = {side: statistics.median(t for r in rs for t in r[kind]["wall_rounds"]) for side, rs in runs.items()}
        per = [statistics.median(off[kind]["wall_rounds"]) / statistics.median(on[kind]["wall_rounds"])
               for off, on in zip(runs["off"], runs["on"], strict=True)]  # each pair of processes alone
        faults = {side: statistics.median(r[kind]["faults_per_call"] for r in rs) for side, rs in runs.items()}
        cpu = {side: statistics.median(r[kind]["cpu_s"] for r in rs) for side, rs in runs.items()}
        sys_ms = {side: 1e3 * statistics.median(r[kind]["sys_s"] for r in rs) for side, rs in runs.items()}
        rows.append({"group": "fastpath", "row": f"allocator keeps freed memory ({kind} shapes b{batch})",
                     "unit": "img/s", "ours": batch / wall["on"], "reference": batch / wall["off"],
                     "speedup": wall["off"] / wall["on"], "ran_as": "fp32-sdpa", "speedup_range": [min(per), max(per)],
                     "cpu_speedup": cpu["off"] / cpu["on"] if cpu["on"] > 0 else None,
                     "note": f"on vs off, {pairs} processes each; page faults/call {faults['on']:.0f} vs "
                             f"{faults['off']:.0f}, kernel CPU ms/call {sys_ms['on']:.1f} vs {sys_ms['off']:.1f}",
                     "faults_per_call": faults, "sys_ms_per_call": sys_ms,
                     "times": {side: [r[kind]["wall_rounds"] for r in rs] for side, rs in runs.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="one side of the allocator switch (run by ldm bench)")
    parser.add_argument("--on", action="store_true", help="keep freed memory (ldm.allocator)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    print(json.dumps(_child(parser.parse_args())))


if __name__ == "__main__":
    main()
