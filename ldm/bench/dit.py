"""DiT vs U-Net on shapes: training throughput, forward Gflops, and the runs behind docs/results/dit.md.

    python -m ldm.bench.dit speed                  # interleaved training img/s + Gflops of every run's denoiser
    python -m ldm.bench.dit run unet dit-shapes/2  # ldm fit (fixed steps) -> export -> ldm adherence -> ldm fid
    python -m ldm.bench.dit report                 # tables + the Gflops-vs-FD plot from the runs' JSON

A run is ``ldm fit`` of configs/ldm/shapes.yaml (the U-Net) or configs/ldm/shapes-dit.yaml (the DiT, with the
geometry of the run's name) at a fixed step count with the time budget off, then ``ldm export``, ``ldm adherence``
and ``ldm fid`` exactly as a user would run them; CPU seconds of the fit are recorded with wall time and the load
average. Gflops are counted as the paper counts them: multiply-adds of one forward pass of one sample
(``torch.utils.flop_counter`` counts 2 per multiply-add), which reproduces DiT Table 4 (XL/2: 118.6).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.conditioning import Conditioning
from ldm.io import write_json

ROOT = Path("checkpoints/dit-bench")
ARTIFACTS = Path("checkpoints/shapes")
PARTS = {"vae_path": ARTIFACTS / "parts" / "vae", "text_encoder_path": ARTIFACTS / "parts" / "text_encoder"}
PROBE = ARTIFACTS / "parts" / "probe"
DATA = Path("datasets/shapes")
CACHE = Path("checkpoints/shapes/cache")
STEPS = 1000          # every run: the same number of optimizer steps of batch 32 (the paper's fixed-steps sweep)
BATCH = 32
FID_N = 300           # generated images per FD (the first n val captions); the tables compare runs at this n


def run_spec(name: str) -> tuple[str, dict[str, Any], int]:
    """(config file, its denoiser block for this run, steps) of a run: ``unet``, ``dit-<size>/<patch>``, with an
    optional ``@<steps>`` (default :data:`STEPS`)."""
    import yaml

    from ldm.cli.train import CONFIG_ROOT

    name, _, steps = name.partition("@")
    if name != "unet" and not name.startswith("dit-"):
        raise ValueError(f"unknown run {name!r}: use unet or dit-<size>/<patch>, e.g. dit-shapes/2@1400")
    config = "shapes.yaml" if name == "unet" else "shapes-dit.yaml"
    block = yaml.safe_load((CONFIG_ROOT / "ldm" / config).read_text())["model"]["init_args"]["denoiser"]
    if name != "unet":
        from ldm.modules.dit import DiTConfig

        cfg = DiTConfig.preset("DiT-" + name[4:])
        block.update(depth=cfg.depth, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, patch_size=cfg.patch_size)
    return config, block, int(steps or STEPS)


def build(name: str) -> torch.nn.Module:
    """The run's denoiser, built as LatentDiffusion builds it (config block + the demo parts' widths)."""
    from ldm.modules.denoiser import build_denoiser

    widths = {"in_channels": 4, "out_channels": 4, "context_dim": 64, "pooled_dim": 128, "input_size": 8}
    return build_denoiser(run_spec(name)[1], widths)


def dummy_conditioning(config: Any, batch: int, tokens: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> Conditioning:
    """Random text tokens (+ pooled, + labels) shaped for ``config`` (a denoiser config)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) if str(device) != "meta" else torch.empty(*shape, device="meta")
    extras = {}
    if getattr(config, "num_classes", None):
        extras["label"] = torch.zeros(batch, dtype=torch.long, device=device)
    pooled = randn(batch, config.pooled_dim).to(device) if config.pooled_dim else None
    return Conditioning(randn(batch, tokens, config.context_dim).to(device), None, pooled, extras)


def forward_gflops(denoiser: torch.nn.Module, latent_size: int | None = None, tokens: int = 1) -> float:
    """Multiply-adds (1e9) of one forward pass of one sample: DiT's "Gflops" (Peebles & Xie 2023, Table 4).

    ``latent_size`` defaults to the config's ``input_size``; works on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = denoiser.config
    size = latent_size or getattr(cfg, "input_size", None)
    if size is None:
        raise ValueError(f"{type(denoiser).__name__} has no fixed input_size: pass latent_size")
    device = next(denoiser.parameters()).device
    x = torch.empty(1, cfg.in_channels, size, size, device=device)
    if device.type != "meta":
        x.normal_()
    cond = dummy_conditioning(cfg, 1, tokens, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser(x, torch.ones(1, device=device), cond)
    return counter.get_total_flops() / 2e9


def measure_speed(names: list[str], steps: int = 12, rounds: int = 4, warmup: int = 2, tokens: int = 12,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Training steps (forward + eps MSE + backward + fused AdamW, batch 32) of every run's denoiser, interleaved
    round by round in this process so load from other processes hits all alike; median CPU and wall seconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 8, 8, generator=g)
    t = torch.rand(BATCH, generator=g) * 999
    models = {}
    for name in names:
        torch.manual_seed(seed)
        model = build(name).train()
        with torch.no_grad():  # zero-initialised layers drawn: the backward pass does its full work
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
        cond = dummy_conditioning(model.config, BATCH, tokens, "cpu", g)
        models[name] = {"model": model, "cond": cond, "opt": torch.optim.AdamW(model.parameters(), fused=True),
                        "cpu": [], "wall": []}

    def step(s: dict[str, Any]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        loss = F.mse_loss(s["model"](x, t, s["cond"]), x)
        s["opt"].zero_grad(set_to_none=True)
        loss.backward()
        s["opt"].step()
        return time.process_time() - cpu, time.perf_counter() - wall

    for s in models.values():
        for _ in range(warmup):
            step(s)
    for _ in range(rounds):
        for s in models.values():
            for _ in range(max(1, steps // rounds)):
                cpu, wall = step(s)
                s["cpu"].append(cpu)
                s["wall"].append(wall)
    rows = []
    for name, s in models.items():
        cpu, wall = statistics.median(s["cpu"]), statistics.median(s["wall"])
        rows.append({"run": name, "params": sum(p.numel() for p in s["model"].parameters()),
                     "gflops": forward_gflops(s["model"], 8), "step_cpu_s": cpu, "step_wall_s": wall,
                     "img_per_cpu_s": BATCH / cpu, "img_per_s": BATCH / wall})
    return rows


def _ldm(*args: str) -> None:
    command = [sys.executable, "-c", "import sys; from ldm.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    print("+ ldm", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def run(name: str, root: Path = ROOT, adherence_n: int = 200, fid_n: int = FID_N) -> dict[str, Any]:
    """Train, export and evaluate one run; returns (and writes to <root>/<run>/run.json) its figures.

    Steps already done are kept (a run folder with ``last.ckpt`` is not refitted, an exported pipeline not
    re-exported, an evaluation at the same n not repeated); ``adherence_n`` / ``fid_n`` 0 skip that evaluation."""
    config, block, steps = run_spec(name)
    out = root / name.replace("/", "-")
    pipeline, ckpt = out / "pipeline", out / "ldm" / "checkpoints" / "last.ckpt"
    result: dict[str, Any] = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    result.update(run=name, steps=steps, batch=BATCH)
    if not ckpt.is_file():
        fit_args = ["fit", "--config", str(Path("ldm/configs/ldm") / config),
                    "--model.vae_path", str(PARTS["vae_path"]),
                    "--model.text_encoder_path", str(PARTS["text_encoder_path"]),
                    "--model.sample_every_n_val", "0", "--data.cache_dir", str(CACHE),
                    "--data.batch_size", str(BATCH), "--trainer.default_root_dir", str(out / "ldm"),
                    "--trainer.max_time", "null", "--trainer.max_steps", str(steps),
                    "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "16",
                    "--trainer.enable_progress_bar", "false", "--model.denoiser", json.dumps(block)]
        load = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        _ldm(*fit_args)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.update(fit_wall_s=time.perf_counter() - wall, loadavg_before=load, loadavg_after=os.getloadavg(),
                      fit_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))
    result["val_loss"] = final_val_loss(out / "ldm")
    if not (pipeline / "pipeline.json").is_file():
        _ldm("export", "--ckpt", str(ckpt), "--out", str(pipeline))
    if adherence_n and (result.get("adherence") or {}).get("n") != adherence_n:
        _ldm("adherence", "--pipeline", str(pipeline), "--probe", str(PROBE), "--data", str(DATA),
             "--n", str(adherence_n), "--out", str(out / "adherence.json"))
        result["adherence"] = json.loads((out / "adherence.json").read_text())["results"][0]
    if fid_n and f"fid_n{fid_n}" not in result:
        _ldm("fid", "--pipeline", str(pipeline), "--data", str(DATA), "--probe", str(PROBE), "--n", str(fid_n),
             "--cache-dir", str(root / "fid_cache"), "--out", str(out / f"fid-n{fid_n}.json"))
        result[f"fid_n{fid_n}"] = json.loads((out / f"fid-n{fid_n}.json").read_text())
    write_json(out / "run.json", result)
    return result


def final_val_loss(run_dir: Path) -> float | None:
    """The last ``val/loss`` of a run's metrics.csv (the newest version)."""
    import csv

    versions = sorted(run_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return None
    values = [float(r["val/loss"]) for r in csv.DictReader(versions[-1].open()) if r.get("val/loss")]
    return values[-1] if values else None


def load_runs(root: Path = ROOT, fid_n: int = FID_N) -> dict[str, dict[str, Any]]:
    """Every run's figures (run.json), flattened: prompt adherence (``ldm adherence``), and FD, KID, CLIP score and
    val-caption adherence of ``ldm fid`` at n = 1000 (``*_1000``) and at ``fid_n``."""
    runs = {}
    for path in sorted(root.glob("*/run.json")):
        r = json.loads(path.read_text())
        for n, suffix in ((1000, "_1000"), (fid_n, "")):
            fid = r.get(f"fid_n{n}") or {}
            r.update({f"fd_clip{suffix}": fid.get("fd_clip"), f"kid_clip{suffix}": fid.get("kid_clip"),
                      f"clip_score{suffix}": fid.get("clip_score"), f"caption_all_three{suffix}": fid.get("all_three"),
                      f"caption_n{suffix}": fid.get("adherence_n")})
        adh = r.get("adherence") or {}
        r.update({k: adh.get(k) for k in ("color", "shape", "position", "size", "all_three")})
        runs[r["run"]] = r
    return runs


def plot_scaling(rows: list[dict[str, Any]], unet: dict[str, Any] | None, out: Path) -> Path:
    """DiT's Figure 9 (FID vs Gflops) at our scale: FD and val-caption adherence vs forward Gflops, one marker per
    size, one colour per patch size; the U-Net as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    markers, colours = {"shapes-XS": "o", "shapes-S": "s", "shapes": "D"}, {1: "tab:red", 2: "tab:blue"}
    for ax, key, label in ((axes[0], "fd_clip", f"FD in CLIP space ({FID_N} val captions)"),
                           (axes[1], "caption_all_three", "adherence: colour, shape and position (%)")):
        scale = 100 if key == "caption_all_three" else 1
        for patch in (2, 1):
            line = sorted((r for r in rows if r["patch"] == patch and r.get(key) is not None),
                          key=lambda r: r["gflops"])
            ax.plot([r["gflops"] for r in line], [scale * r[key] for r in line], color=colours[patch], alpha=0.4)
            for r in line:
                ax.scatter(r["gflops"], scale * r[key], marker=markers[r["dit_size"]], color=colours[patch], s=50,
                           label=f"DiT-{r['dit_size']}/{patch}")
        if unet is not None and unet.get(key) is not None:
            ax.scatter(unet["gflops"], scale * unet[key], marker="*", color="black", s=150, label="U-Net (shapes)")
        ax.set_xscale("log")
        ax.set_xlabel("forward Gflops (multiply-adds, one 8x8x4 latent)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DiT scaling on shapes, {STEPS} steps x batch {BATCH} each (cf. Peebles & Xie 2023, Fig. 9)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(root: Path = ROOT, plot: Path | None = None) -> str:
    """Markdown tables of the runs (joined with the speed bench) and the scaling plot."""
    from ldm.table import format_table, percent

    runs = load_runs(root)
    speed = {r["run"]: r for r in json.loads((root / "speed.json").read_text())["rows"]} \
        if (root / "speed.json").is_file() else {}
    for name, r in runs.items():
        base = name.partition("@")[0]
        r.update({k: v for k, v in speed.get(base, {}).items() if k != "run"})
        r.setdefault("steps", run_spec(name)[2])
        if r.get("step_cpu_s"):  # training compute of the run at the bench's (interleaved) speed
            r["train_cpu_s"] = r["steps"] * r["step_cpu_s"]
        if base.startswith("dit-"):
            r["dit_size"], _, patch = base[4:].partition("/")
            r["patch"] = int(patch)
    common = [("run", "run", ""), ("params", "params", ","), ("gflops", "Gflops", ".3f"), ("steps", "steps", ""),
              ("img_per_cpu_s", "train img/CPU-s", ".0f"), ("train_cpu_s", "train CPU-s", ".0f"),
              ("fit_cpu_s", "ldm fit CPU-s", ".0f"), ("val_loss", "val loss", ".4f")]
    main_runs = [runs[n] for n in ("unet", "dit-shapes/2", "dit-shapes/2@1500", "dit-shapes/1") if n in runs]
    text = format_table(main_runs, common + [
        ("color", "colour %", percent("color")), ("shape", "shape %", percent("shape")),
        ("position", "position %", percent("position")), ("size", "size %", percent("size")),
        ("all_three", "all three %", percent("all_three")), ("fd_clip_1000", "FD (n=1000)", ".2f"),
        ("fd_clip", f"FD (n={FID_N})", ".2f")], markdown=True)
    sweep = [r for n, r in runs.items() if "@" not in n and n.startswith("dit-")]
    text += "\n\n" + format_table(sorted(sweep, key=lambda r: (-r["patch"], r["gflops"])) + [runs.get("unet", {})],
                                   common + [("fd_clip", f"FD (n={FID_N})", ".2f"),
                                             ("kid_clip", "KID", ".3f"), ("clip_score", "CLIP score", ".1f"),
                                             ("caption_all_three", "caption adherence %",
                                              percent("caption_all_three")),
                                             ("caption_n", "captions read", "")], markdown=True)
    if plot is not None and sweep:
        plot_scaling(sweep, runs.get("unet"), plot)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.bench.dit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed", help="interleaved training throughput and Gflops of the runs' denoisers")
    speed.add_argument("runs", nargs="+")
    speed.add_argument("--steps", type=int, default=12)
    speed.add_argument("--out", type=Path, default=ROOT / "speed.json")
    runs = sub.add_parser("run", help="fit, export and evaluate runs (unet, dit-<size>/<patch>[@steps])")
    runs.add_argument("runs", nargs="+")
    runs.add_argument("--adherence-n", type=int, default=200, help="ldm adherence --n (0: skip)")
    runs.add_argument("--fid-n", type=int, default=FID_N, help="ldm fid --n (0: skip)")
    rep = sub.add_parser("report", help="Markdown tables of the finished runs and the Gflops plot")
    rep.add_argument("--plot", type=Path, default=Path("docs/results/dit_scaling.png"))
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report(ROOT, args.plot))
        return 0
    if args.command == "speed":
        torch.set_num_threads(1)
        load = os.getloadavg()
        rows = measure_speed(args.runs, steps=args.steps)
        write_json(args.out, {"rows": rows, "loadavg": [load, os.getloadavg()], "threads": 1,
                              "cpu": platform.processor(), "time": time.strftime("%Y-%m-%d %H:%M")})
        from ldm.table import format_table

        print(format_table(rows, [("run", "run", ""), ("params", "params", ","), ("gflops", "Gflops", ".3f"),
                                  ("step_cpu_s", "CPU s/step", ".3f"), ("img_per_cpu_s", "img/CPU-s", ".0f"),
                                  ("img_per_s", "img/s", ".0f")]))
        return 0
    for name in args.runs:
        print(json.dumps(run(name, adherence_n=args.adherence_n, fid_n=args.fid_n), indent=1, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
