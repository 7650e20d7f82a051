"""Data-parallel throughput on this machine: 2 DDP processes vs 1, same per-process batch, with a breakdown.

    ldm bench ddp                       # LDM U-Net of configs/ldm/shapes.yaml, batch 32 per process
    ldm bench ddp --batch 64 --steps 30 --layouts 1x1 2x1

Each layout ``PxT`` is P processes with T intra-op threads each (``1x2`` uses both cores in one process,
``2x1`` one core per DDP rank on gloo). A layout trains the LatentDiffusion U-Net through Lightning exactly
as ``ldm fit`` does (AdamW, EMA, LR schedule, min-SNR loss) on synthetic cached latents (8×8×4, 12 tokens of
a random 128-wide text encoder), started like torchrun starts ranks. Per layout: global img/s over the timed
steps (P × batch / step time), the step time breakdown of :class:`ldm.training.StepTimer` (data, forward,
backward, optimizer) and the gradient all-reduce time per step (:class:`ldm.training.AllReduceTimer`;
it overlaps the backward pass). The speed-up of each layout is its img/s over the first layout's, measured
in the same invocation. Results: a table on stdout and JSON in ``checkpoints/bench/ddp.json``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from ldm.io import write_json

REPO_ROOT = Path.cwd()
DEFAULT_CONFIG = Path(str(resources.files("ldm") / "configs" / "ldm" / "shapes.yaml"))


def unet_settings(config: Path) -> dict[str, Any]:
    """The U-Net, schedule and loss settings of an LDM config (``model.init_args``), without the part paths."""
    import yaml

    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    keep = ("denoiser", "noise_schedule", "loss_weighting", "min_snr_gamma", "p_uncond", "optimizer", "lr_schedule",
            "ema_decay")
    return {k: init[k] for k in keep if k in init}


def random_parts(folder: Path) -> tuple[str, str]:
    """Random-weight VAE (f=4, 4 latent channels) and text encoder (128-wide tokens) exported to ``folder``."""
    from ldm.io import save_part
    from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from ldm.modules.text_encoder import CLIPTextConditioner, CLIPTextConditionerConfig

    torch.manual_seed(0)
    save_part(AutoencoderKL(AutoencoderKLConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                                                norm_groups=4, resolution=32, mid_attention=False)), folder / "vae")
    save_part(CLIPTextConditioner(CLIPTextConditionerConfig(context_length=24, width=128, heads=4, layers=1,
                                                            embed_dim=128)), folder / "text_encoder")
    return str(folder / "vae"), str(folder / "text_encoder")


def synthetic_latents(n: int, tokens: int = 12, dim: int = 128) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [{"latent_mean": torch.randn(4, 8, 8, generator=g), "latent_std": 0.1 * torch.ones(4, 8, 8),
             "context": torch.randn(tokens, dim, generator=g), "mask": torch.arange(tokens) < 8, "caption": "x"}
            for _ in range(n)]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    from ldm.conditioning import Conditioning

    batch = {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
             for k in items[0]}
    batch["cond"] = Conditioning(batch.pop("context"), batch.pop("mask"))
    return batch


def rank_main(spec_file: str) -> None:
    """One rank of one layout, as :func:`run_layout` starts it: fit ``warmup + steps`` batches of the spec
    (a JSON file of :func:`run_layout`'s settings); rank 0 writes the timings to the spec's ``result``."""
    import pytorch_lightning as pl

    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.training import AllReduceTimer, ResumableLoader, StepTimer

    spec = json.loads(Path(spec_file).read_text())
    batch, warmup, steps = spec["batch"], spec["warmup"], spec["steps"]
    torch.set_num_threads(spec["threads"])
    world = int(os.environ.get("WORLD_SIZE", 1))
    vae, text = spec["parts"]
    model = LatentDiffusion(vae_path=vae, text_encoder_path=text, resolution=32, val_prompts=None,
                            sample_every_n_val=0, **spec["settings"])
    loader = ResumableLoader(synthetic_latents(batch * world * (warmup + steps)), batch_size=batch,
                             shuffle=True, drop_last=True, collate_fn=collate)
    strategy: Any = pl.strategies.DDPStrategy(process_group_backend="gloo") if world > 1 else "auto"
    timer, comm = StepTimer(skip_first=warmup), AllReduceTimer(skip_first=warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=warmup + steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[timer, comm])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    if trainer.is_global_zero:
        ms, reduced = timer.summary(), comm.summary()
        ms["allreduce"] = reduced["allreduce"]
        write_json(spec["result"], {"processes": world, "threads": spec["threads"], "batch": batch,
                                    "timed_steps": timer.batches, "ms": ms,
                                    "img_per_s": world * batch * 1000 / ms["step"],
                                    "allreduce_mib_per_step": reduced["allreduce_mib"],
                                    "allreduce_calls_per_step": reduced["allreduce_calls"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(processes: int, threads: int, batch: int, steps: int, warmup: int, parts: tuple[str, str],
               settings: dict, folder: Path) -> dict[str, Any]:
    """Start ``processes`` ranks the way torchrun does (each runs :func:`rank_main`); rank 0's timings."""
    result = folder / f"{processes}x{threads}.json"
    spec = folder / f"{processes}x{threads}-spec.json"
    spec.write_text(json.dumps({"threads": threads, "batch": batch, "steps": steps, "warmup": warmup,
                                "parts": list(parts), "settings": settings, "result": str(result)}))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes),
           "LOCAL_WORLD_SIZE": str(processes), "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "ldm-bench",
           "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", "import sys; from ldm.bench.ddp import rank_main; rank_main(sys.argv[1])",
               str(spec)]
    procs = [subprocess.Popen(command, cwd=REPO_ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(processes)]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"layout {processes}x{threads} failed:\n" + "\n".join(e[-3000:] for e in errors))
    return json.loads(result.read_text())


def format_table(rows: list[dict[str, Any]]) -> str:
    """One row per layout: img/s, speed-up over the first layout, and the step's time split in ms."""
    from ldm.table import format_table as table

    columns = [("layout", "layout", lambda r: f"{r['processes']}x{r['threads']}"), ("batch", "batch", ""),
               ("img_per_s", "img/s", ".1f"), ("speedup", "speedup", ".2f")]
    columns += [(part, header, lambda r, part=part: f"{r['ms'][part]:.1f}")
                for part, header in (("step", "step ms"), ("data", "data"), ("forward", "fwd"), ("backward", "bwd"),
                                     ("optimizer", "optim"), ("allreduce", "allred"))]
    return table(rows, columns)


def benchmark(config: Path = DEFAULT_CONFIG, layouts: Sequence[tuple[int, int]] = ((1, 1), (2, 1), (1, 2)),
              batch: int = 32, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Every layout (processes, threads) of the U-Net of the LDM ``config``; the JSON-ready result, each row's
    ``speedup`` relative to the first layout."""
    settings = unet_settings(config)
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        parts = random_parts(Path(tmp))
        for processes, threads in layouts:
            start = time.perf_counter()
            row = run_layout(processes, threads, batch, steps, warmup, parts, settings, Path(tmp))
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
    for row in rows:
        row["speedup"] = row["img_per_s"] / rows[0]["img_per_s"]
    return {"benchmark": "ddp-train-step", "config": str(config), "denoiser": settings.get("denoiser"),
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_before": load, "load_average_after": os.getloadavg(), "results": rows}
