"""Measuring tools shared by the benchmarks: interleaved timing, peak memory, model FLOPs, the CPU's peak.

Timings on a shared machine are only comparable within one run, so :func:`interleaved` runs the contenders
round by round (the order rotating each round) and reports medians of wall and CPU time; ratios of two
contenders measured together are what a benchmark reports.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ldm.memory import peak_bytes


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Each contender ``warmup`` times, then ``rounds`` rounds of one call each (order rotated every round);
    per contender the median and the minimum wall time, the median CPU time, in seconds, and every round's wall
    time (``wall_rounds``, for :func:`round_range`)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timed(fns[name], device))
    return {n: {"wall_s": statistics.median(w for w, _ in s), "wall_min_s": min(w for w, _ in s),
                "cpu_s": statistics.median(c for _, c in s), "wall_rounds": [w for w, _ in s]}
            for n, s in samples.items()}


def round_range(reference: dict[str, Any], ours: dict[str, Any]) -> list[float] | None:
    """The lowest and highest speedup (reference time / ours) among the rounds of one :func:`interleaved` run,
    each round's two calls taken together: how far one round's ratio strays (None without per-round times)."""
    pairs = list(zip(reference.get("wall_rounds", []), ours.get("wall_rounds", []), strict=False))
    ratios = [r / o for r, o in pairs if o > 0]
    return [min(ratios), max(ratios)] if ratios else None


def peak_memory(fn: Callable[[], Any], modules: tuple[Any, ...] = (), device: torch.device | str = "cpu") -> int:
    """Peak bytes during one call of ``fn``: the persistent state of ``modules`` (parameters, optimizer state)
    plus the largest sum of tensors created by the call and alive at once (:func:`ldm.memory.peak_bytes`: the
    allocator's peak on CUDA, counted op by op elsewhere: exact, deterministic, blind to other processes)."""
    return peak_bytes(fn, device) + _state_bytes(modules)


def _state_bytes(modules: tuple[Any, ...]) -> int:
    tensors: dict[int, torch.Tensor] = {}
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for p in m.parameters():
                tensors[id(p)] = p
        elif isinstance(m, torch.optim.Optimizer):
            for state in m.state.values():
                tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def forward_flops(fn: Callable[[], Any]) -> int:
    """Model FLOPs of one call (torch.utils.flop_counter: matmuls, convolutions as direct convolutions,
    attention), with no gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


# ---- this CPU's peak: the best of several kernels ----------------------------------------------------------
def _kernels(dtype: torch.dtype, device: torch.device, small: bool) -> dict[str, tuple[Callable[[], Any], float]]:
    """name -> (call, FLOPs per call). Square GEMMs at three sizes (five on a GPU, whose peak needs larger ones) and
    3x3 convolutions, counted as direct convolution 2·B·Cin·Cout·H·W·9 (a Winograd kernel can exceed the GEMM rate
    under that count)."""
    out: dict[str, tuple[Callable[[], Any], float]] = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    large = (4096, 8192) if device.type == "cuda" else ()
    for n in ((64, 128) if small else (512, 1024, 2048, *large)):
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        out[f"gemm {n}"] = (lambda a=a, b=b: a @ b, 2.0 * n ** 3)
    convs = ((2, 8, 8),) if small else ((32, 128, 16), (32, 64, 32), (32, 256, 8))
    for batch, ch, size in convs:
        x = torch.randn(batch, ch, size, size, generator=g).to(device, dtype)
        w = torch.randn(ch, ch, 3, 3, generator=g).to(device, dtype)
        out[f"conv3x3 {ch}ch {size}x{size} b{batch}"] = (lambda x=x, w=w: F.conv2d(x, w, padding=1),
                                                         2.0 * batch * ch * ch * size * size * 9)
    return out


def peak_throughput(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16), device: str = "cpu",
                    repeats: int = 5, small: bool = False) -> dict[str, Any]:
    """GFLOP/s of each kernel (the fastest of ``repeats`` calls after one warm-up) per dtype, and the best
    per dtype: this machine's peak as measured now, with the threads torch uses. Also GFLOP per CPU-second
    (``peak_gflops_per_cpu_s``): one core's rate, which waiting for a core on a shared machine does not lower."""
    dev = torch.device(device)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "kernels": {}, "peak_gflops": {},
                              "kernels_per_cpu_s": {}, "peak_gflops_per_cpu_s": {}, "peak_kernel": {}}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        rates, per_cpu = {}, {}
        for kernel, (call, flops) in _kernels(dtype, dev, small).items():
            call()
            runs = [timed(call, dev) for _ in range(repeats)]
            rates[kernel] = flops / min(w for w, _ in runs) / 1e9
            per_cpu[kernel] = flops / max(min(c for _, c in runs), 1e-9) / 1e9
        result["kernels"][name], result["kernels_per_cpu_s"][name] = rates, per_cpu
        result["peak_gflops"][name] = max(rates.values())
        result["peak_gflops_per_cpu_s"][name] = max(per_cpu.values())
        result["peak_kernel"][name] = max(rates, key=rates.get)
    return result


def run_context() -> dict[str, Any]:
    """What a result depends on: the CPU, threads, torch, the load average (other processes) now."""
    from ldm.fastpath import cpu_flags, cpu_model

    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": list(os.getloadavg()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
