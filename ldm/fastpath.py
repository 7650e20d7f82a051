"""The fast path: numeric precision and attention kernel chosen by measurement on the machine at hand.

A :class:`FastPath` is a precision ("fp32"; "bf16": ``torch.autocast`` with bfloat16, fp32 weights and optimizer
state; "mixed": autocast in the attention blocks only; for sampling also "pure-bf16": a whole-bfloat16 copy of the
denoiser, no casts between ops, :class:`BFloat16Denoiser`) and an attention kernel
(``ldm.modules.attention.attention_backend``: "sdpa" or "math").
Whether bf16 pays depends on the processor (AVX512-BF16/AMX CPUs and tensor-core GPUs run bf16 matmuls several
times faster; others not at all), on the torch build and on the tensor sizes (at small sizes the casts cost more
than the math saves), so nothing is assumed: :func:`choose` with the setting "auto" times every candidate on the
actual workload (a few interleaved rounds, the fastest round of each: CPU seconds on a CPU, where waiting for a
core on a shared machine does not count, wall seconds on a GPU; a candidate twice as slow as the fastest after one
round is timed no further), keeps fp32 + SDPA unless another candidate is at least ``MIN_GAIN`` faster in two
independent trials (a third decides where the first two disagree), and caches the answer per machine and workload
in a JSON file (``$LDM_FASTPATH_CACHE``, default ``~/.cache/ldm/fastpath.json``), so the measurement runs
once per machine.

The environment variable ``LDM_PRECISION`` (fp32 | bf16 | auto) overrides the "auto" setting (the test suite
pins fp32 so its exact values do not depend on the machine).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")
MIN_GAIN = 1.1        # a candidate other than fp32 + sdpa must be this much faster to be chosen
DROP_FACTOR = 2.0     # a candidate this much slower than the fastest after one round is timed no further
PROBE_VERSION = 6     # part of the cache key: choices made by older probes or kernels are measured again
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class FastPath:
    """One way to run a model: ``precision`` "fp32" | "bf16" (autocast everywhere) | "mixed" (autocast in the
    attention blocks only: linears and attention in bf16, convolutions in fp32) | "pure-bf16" (sampling only: the
    whole denoiser in bfloat16, :class:`BFloat16Denoiser`, made by :meth:`prepare`) | "ambient" (whatever autocast
    is in force around the call, e.g. a Lightning Trainer's bf16-mixed: left as it is, never measured) and the
    ``attention`` kernel."""

    precision: str = "fp32"
    attention: str = "sdpa"

    def prepare(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """The module that runs ``denoiser`` on this path: a :class:`BFloat16Denoiser` copy for "pure-bf16" (make
        it once per sampling run: the copy costs a pass over the weights), else ``denoiser`` itself."""
        return BFloat16Denoiser(denoiser) if self.precision == "pure-bf16" else denoiser

    @property
    def name(self) -> str:
        return f"{self.precision}-{self.attention}"

    @contextlib.contextmanager
    def context(self, device: torch.device | str) -> Iterator[None]:
        """Run the block this way on ``device`` (autocast for bf16, the attention kernel)."""
        from ldm.modules.attention import attention_backend, transformer_autocast

        device_type = torch.device(device).type
        autocast = (contextlib.nullcontext() if self.precision == "ambient"
                    else torch.autocast(device_type, torch.bfloat16, enabled=self.precision == "bf16"))
        with attention_backend(self.attention), autocast, \
                transformer_autocast(torch.bfloat16 if self.precision == "mixed" else None):
            yield


class BFloat16Denoiser(torch.nn.Module):
    """A bfloat16 copy of a denoiser ``model(x, t, cond)`` for sampling: weights and floating buffers cast once
    (no transient fp32 duplicate; the original is untouched), every activation bf16 from input to output, so no
    per-op casts as under autocast; ``x`` and the conditioning's floating tensors are cast in, the output back to
    ``x``'s dtype (the sampler's arithmetic stays fp32). ``config`` is the original's (what the sampler reads)."""

    def __init__(self, denoiser: torch.nn.Module):
        super().__init__()
        memo: dict[int, Any] = {}
        for p in denoiser.parameters():
            if p.is_floating_point():
                memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
        for b in denoiser.buffers():
            if b.is_floating_point():
                memo[id(b)] = b.detach().to(torch.bfloat16)
        self.inner = copy.deepcopy(denoiser, memo).eval()
        self.config = getattr(denoiser, "config", None)
        self._cast: dict[int, tuple[Any, Any]] = {}  # id(cond) -> (cond, its bf16 cast): the same tensors every step

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16), t, self._bf16(cond)).to(x.dtype)

    def _bf16(self, cond: Any) -> Any:
        """``cond`` cast to bf16, the same cast tensors for the same ``cond`` (so the text-only work a sampling run
        keeps, ``ldm.modules.reuse``, is found again on the next step)."""
        hit = self._cast.get(id(cond))
        if hit is None or hit[0] is not cond:
            if len(self._cast) >= 8:
                self._cast.clear()
            hit = self._cast[id(cond)] = (cond, cond.to(dtype=torch.bfloat16))
        return hit[1]


REFERENCE = FastPath("fp32", "sdpa")
AMBIENT = FastPath("ambient", "sdpa")  # a Trainer's own mixed precision rules (not a candidate: nothing to time)
CANDIDATES = (REFERENCE, FastPath("fp32", "math"), FastPath("bf16", "sdpa"), FastPath("bf16", "math"),
              FastPath("mixed", "sdpa"), FastPath("mixed", "math"), FastPath("pure-bf16", "sdpa"))
SAMPLING_ONLY = ("pure-bf16",)  # precisions that keep no fp32 weights: never candidates for a training step


def check_precision(value: str, what: str = "precision") -> str:
    """``value`` if it is a precision setting, else a UsageError naming ``what``."""
    if value not in PRECISIONS:
        raise UsageError(f"{what} must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def resolve_setting(setting: str) -> str:
    """The setting in force: ``LDM_PRECISION`` replaces "auto" when set."""
    check_precision(setting)
    if setting == "auto" and os.environ.get("LDM_PRECISION"):
        return check_precision(os.environ["LDM_PRECISION"], "LDM_PRECISION")
    return setting


def cpu_model() -> str:
    """The CPU's model name (lscpu's), or the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-unit flags of /proc/cpuinfo that decide fp32/bf16 speed (recorded, never used to decide)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f in flags]


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a measured choice depends on besides the workload: processor, threads, torch build."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "cpu": cpu_model(),
                            "cpu_flags": cpu_flags(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cache_path() -> Path:
    if os.environ.get("LDM_FASTPATH_CACHE"):
        return Path(os.environ["LDM_FASTPATH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ldm" / "fastpath.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    from ldm.io import write_json

    try:
        write_json(path, {**_read_cache(path), key: entry})
    except OSError:
        pass  # a read-only home: the choice is measured again next time


@functools.cache
def bf16_kernel_speedup(device: str = "cpu", repeats: int = 5) -> float:
    """How much faster bf16 runs this device's two workhorse kernels than fp32: the better of a 512² matmul and
    a 3×3 convolution (64 channels, 16×16, batch 8), fp32 time over bf16 time, best of ``repeats`` (under a
    second on a CPU; once per process). Below 1 no bf16 candidate can win: the processor has no fast bf16 and
    every cast only adds (on an AVX2-only CPU one bf16 training step of the shapes U-Net cost 17 fp32 ones)."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen).to(dev), torch.randn(512, 512, generator=gen).to(dev)
    x, w = torch.randn(8, 64, 16, 16, generator=gen).to(dev), torch.randn(64, 64, 3, 3, generator=gen).to(dev)
    kernels = {"matmul": lambda a, b: a @ b, "conv": lambda x, w: torch.nn.functional.conv2d(x, w, padding=1)}
    inputs = {"matmul": (a, b), "conv": (x, w)}

    def best(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], enough: float = math.inf) -> float:
        """Fastest of ``repeats`` timed calls after one untimed one (primitive creation); stops early once a call
        takes longer than ``enough`` seconds."""
        fastest = math.inf
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            with torch.inference_mode():
                fn(*args)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:
                fastest = min(fastest, time.perf_counter() - start)
                if fastest > enough:
                    break
        return fastest

    ratios = []
    for name, fn in kernels.items():
        fp32 = best(fn, inputs[name])
        ratios.append(fp32 / best(fn, tuple(t.bfloat16() for t in inputs[name]), enough=4 * fp32))
    return max(ratios)


def time_candidates(run: Callable[[FastPath], None], candidates: tuple[FastPath, ...], device: torch.device | str,
                    rounds: int = 3, warmup: int = 1, metric: str = "cpu_s",
                    drop_factor: float = DROP_FACTOR) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds per call of ``run(candidate)`` inside each candidate's context, each the fastest of
    ``rounds`` rounds (candidates interleaved, so load from other processes hits all alike), after ``warmup``
    calls each. A candidate whose first round took more than ``drop_factor`` times the fastest first round (in
    ``metric``) sits out the later rounds: it cannot win, and on a CPU without fast bf16 one bf16 training step
    can cost 17 fp32 ones (its one-round time is still reported). A candidate other than fp32 + SDPA that raises
    (a bf16 kernel this device lacks) is timed no further: its entry carries the ``error`` and no times."""
    device = torch.device(device)
    failed: dict[str, str] = {}

    def once(c: FastPath) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        with c.context(device):
            run(c)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu

    def attempt(c: FastPath) -> tuple[float, float] | None:
        try:
            return once(c)
        except (RuntimeError, NotImplementedError) as e:
            if c == REFERENCE:
                raise
            failed[c.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            return None

    running = list(candidates)
    for _ in range(warmup):
        running = [c for c in running if attempt(c) is not None]
    best = {c.name: {"wall_s": float("inf"), "cpu_s": float("inf")} for c in candidates}
    for r in range(rounds):
        for c in running:
            if (times := attempt(c)) is not None:
                best[c.name] = {"wall_s": min(best[c.name]["wall_s"], times[0]),
                                "cpu_s": min(best[c.name]["cpu_s"], times[1])}
        running = [c for c in running if c.name not in failed]
        if r == 0 and running:
            fastest = min(best[c.name][metric] for c in running)
            running = [c for c in running if best[c.name][metric] <= drop_factor * fastest]
    for name, error in failed.items():
        best[name] = {"wall_s": None, "cpu_s": None, "error": error}
    return best


def pick(times: dict[str, float], min_gain: float = MIN_GAIN) -> FastPath:
    """The fastest candidate, unless it beats fp32 + SDPA (when measured) by less than ``min_gain``."""
    by_name = {c.name: c for c in CANDIDATES}
    fastest = min(times, key=times.get)
    if REFERENCE.name in times and times[fastest] * min_gain > times[REFERENCE.name]:
        return REFERENCE
    return by_name[fastest]


def choose(setting: str, workload: dict[str, Any], run: Callable[[FastPath], None],
           device: torch.device | str = "cpu", rounds: int = 3, use_cache: bool = True,
           log: Callable[[str], None] | None = None, memory: Callable[[FastPath], int] | None = None) -> FastPath:
    """The fast path for ``workload`` (a JSON-able description: model config, shapes, train or sample).

    ``setting`` "fp32" is fp32 + SDPA (nothing measured), "bf16" measures the bf16 candidates (autocast everywhere
    or in the attention blocks only, each attention kernel; for sampling also the whole-bf16 copy; one that raises
    on this device is left out), "auto" measures every candidate, except on a CPU whose
    bf16 kernels are slower than fp32 (:func:`bf16_kernel_speedup`): there it keeps fp32 + SDPA. A measured choice
    is cached per machine and workload; ``run(candidate)`` performs one representative call (run inside the
    candidate's context). ``memory(candidate)``, when given, is the peak bytes of one such call including what the
    path holds (a weight copy): a candidate that would need more than fp32 + SDPA does is not chosen, however fast.
    """
    setting = resolve_setting(setting)
    pool = tuple(c for c in CANDIDATES if workload.get("mode") != "train" or c.precision not in SAMPLING_ONLY)
    candidates = (pool if setting == "auto" else (REFERENCE,) if setting == "fp32"
                  else tuple(c for c in pool if c.precision != "fp32"))
    if len(candidates) == 1:
        return candidates[0]
    cpu = torch.device(device).type == "cpu"  # (a GPU's kernels at these sizes only time launches: always measured)
    if setting == "auto" and cpu and (speedup := bf16_kernel_speedup("cpu")) < 1.0:
        if log:
            log(f"fast path: {REFERENCE.name} (bf16 kernels run at {speedup:.2f}x fp32 here: bf16 not timed)")
        return REFERENCE
    key_data = {"machine": machine(device), "workload": workload, "setting": setting,
                "candidates": [c.name for c in candidates], "probe": PROBE_VERSION}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_path()
    if use_cache:
        cached = _read_cache(path).get(key)
        if cached and cached.get("choice") in {c.name for c in candidates}:
            return next(c for c in candidates if c.name == cached["choice"])
    metric = "wall_s" if torch.device(device).type == "cuda" else "cpu_s"
    if log:
        log(f"fast path: timing {len(candidates)} ways to run this once for this machine and shape "
            f"(the choice is kept in {path})")
    measured = time_candidates(run, candidates, device, rounds=rounds, metric=metric)
    times = {name: m[metric] for name, m in measured.items() if "error" not in m}
    if not times:
        raise UsageError(f"precision {setting!r}: no way to run this works on {torch.device(device)} ("
                         + "; ".join(f"{n}: {m['error']}" for n, m in measured.items()) + "); use fp32")
    peaks = _peaks(memory, candidates, times) if memory is not None and REFERENCE.name in times else {}
    fitting = {n: s for n, s in times.items() if n not in peaks or peaks[n] <= peaks[REFERENCE.name]}
    choice, trials = pick(fitting), []
    if choice != REFERENCE and REFERENCE.name in times:
        # independent trials of the winner against fp32 + SDPA, winner first: the choice is cached for good, so one
        # noisy trial must not make it (a probe once picked a path that sampled 1.2x slower), nor undo it (one
        # confirmation measured a 1.37x winner at 1.07x): where the first two disagree, a third decides
        for _ in range(2):
            again = time_candidates(run, (choice, REFERENCE), device, rounds=rounds, warmup=0, metric=metric)
            trials.append({name: m[metric] for name, m in again.items() if "error" not in m})
            if pick(trials[-1]) == choice:
                break
        if pick(trials[-1]) != choice:
            choice = REFERENCE
    if log:
        log(f"fast path: {choice.name} (" + ", ".join(f"{n} {1e3 * s:.0f} ms" for n, s in times.items())
            + "".join(f"; {word} {', '.join(f'{n} {1e3 * s:.0f} ms' for n, s in trial.items())}"
                      for word, trial in zip(("again", "third"), trials))
            + f", {metric[:-2]} time per call"
            + "".join(f"; {n} needs {peaks[n] / 2**20:.1f} MiB vs {peaks[REFERENCE.name] / 2**20:.1f}: not taken"
                      for n in times if n not in fitting)
            + "".join(f"; {n} failed here ({m['error']})" for n, m in measured.items() if "error" in m) + ")")
    if use_cache:
        _write_cache(path, key, {"choice": choice.name, "seconds": times, "confirmation": (trials or [None])[0],
                                 "third_trial": (trials[1:] or [None])[0], "metric": metric,
                                 "measured": measured, "peak_bytes": peaks,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **key_data})
    return choice


def _peaks(memory: Callable[[FastPath], int], candidates: tuple[FastPath, ...], times: dict[str, float]
           ) -> dict[str, int]:
    """Peak bytes of fp32 + SDPA and of every candidate fast enough to be chosen over it."""
    reference = times[REFERENCE.name]
    return {c.name: memory(c) for c in candidates
            if c == REFERENCE or (c.name in times and times[c.name] * MIN_GAIN <= reference)}


# ---- the two workloads every model has: a training step and a sampling forward -----------------------------
def denoiser_workload(denoiser: torch.nn.Module, x: torch.Tensor, cond: Any, mode: str) -> dict[str, Any]:
    """The cache key of a denoiser call: its class and config, the input shapes and dtype, train or sample."""
    config = getattr(denoiser, "config", None)
    config = asdict(config) if config is not None and hasattr(config, "__dataclass_fields__") else repr(config)
    return {"model": type(denoiser).__name__, "config": config, "mode": mode, "x": list(x.shape),
            "dtype": str(x.dtype), "tokens": list(cond.tokens.shape),
            "mask": cond.mask is not None}


def train_step_probe(denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any
                     ) -> Callable[[FastPath], None]:
    """One forward + backward of a copy of ``denoiser`` on this batch (the optimizer step is fp32 whatever the
    precision, so it is left out); the copy keeps the real model's weights and gradients untouched, and trains
    what the model trains (only the adapters of a LoRA fine-tuning)."""
    twin = copy.deepcopy(denoiser).train()
    if not any(p.requires_grad for p in twin.parameters()):  # a frozen denoiser: time a full backward
        for p in twin.parameters():
            p.requires_grad_(True)
    x, t = x.detach(), t.detach()

    def run(_: FastPath) -> None:
        out = twin(x, t, cond)
        out.float().square().mean().backward()
        twin.zero_grad(set_to_none=True)

    return run


def prepared_probes(denoiser: torch.nn.Module, make: Callable[[torch.nn.Module], Callable[[], Any]],
                    device: torch.device | str = "cpu") -> tuple[Callable[[FastPath], None], Callable[[FastPath], int]]:
    """The ``run`` and ``memory`` of :func:`choose` for an inference call ``make(model)()`` on each candidate's
    prepared denoiser (:meth:`FastPath.prepare`). ``run`` prepares once per candidate (the copy is a per-run cost,
    not a per-step one); ``memory`` prepares inside the counted call, so a weight copy counts
    (:func:`ldm.memory.peak_bytes`)."""
    from ldm.memory import peak_bytes

    calls: dict[str, Callable[[], Any]] = {}

    def run(c: FastPath) -> None:
        if c.name not in calls:
            calls[c.name] = make(c.prepare(denoiser))
        with torch.inference_mode():
            calls[c.name]()

    def memory(c: FastPath) -> int:
        def once() -> None:
            with torch.inference_mode(), c.context(device):
                make(c.prepare(denoiser))()
        return peak_bytes(once, device)

    return run, memory


def forward_memory(denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any,
                   device: torch.device | str = "cpu") -> Callable[[FastPath], int]:
    """``memory`` for :func:`choose`: the peak bytes of preparing a candidate's model (a weight copy) and running
    one inference forward on it."""
    return prepared_probes(denoiser, lambda model: functools.partial(model, x, t, cond), device)[1]


def forward_probe(denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any
                  ) -> Callable[[FastPath], None]:
    """One inference forward of ``denoiser`` on this batch (no weights change), as each candidate prepares it."""
    return prepared_probes(denoiser, lambda model: functools.partial(model, x, t, cond))[0]
