"""The swiss roll of the lecture notes end to end: train the toy ε-model, sample it with every sampler at several
step counts, and draw the figure ``ldm toy`` writes (with sliced Wasserstein distances to held-out data)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objectives import diffusion_loss
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.toy import swiss_roll
from ldm.modules.toy_mlp import ToyMLP


def train_toy(schedule: DiscreteSchedule, steps: int = 4000, batch_size: int = 256, lr: float = 5e-3,
              seed: int = 0, prediction_type: str = "eps", hidden: int = 128) -> tuple[ToyMLP, list[float]]:
    """Fit a :class:`ToyMLP` to the swiss roll with L_simple (DDPM Algorithm 1 / eq. 14); returns the
    model (eval mode) and the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyMLP(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0 = swiss_roll(batch_size, gen)
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = diffusion_loss(model(schedule.q_sample(x0, t, noise), t.float()), x0, noise, t, schedule, prediction_type)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 64, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size 2-D point clouds (sorted projections)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(0)
    pb, _ = (b.double() @ dirs).sort(0)
    return (pa - pb).abs().mean().item()


def run_toy(out_dir: str | Path, samplers: list[str] | None = None, step_counts: list[int] | None = None,
            train_steps: int = 4000, n_samples: int = 2000, seed: int = 0, schedule_name: str = "scaled_linear") -> dict[str, Any]:
    """Train the swiss-roll model, sample it with each sampler × step count, and write
    ``swiss_roll.png`` (data vs samples grid) and ``metrics.json`` (sliced W1 to held-out data) to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = samplers or list(SAMPLERS)
    step_counts = step_counts or [5, 10, 25, 50]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown samplers {unknown}: use any of {list(SAMPLERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schedule = DiscreteSchedule.from_name(schedule_name)
    start, cpu_start = time.perf_counter(), time.process_time()
    model, losses = train_toy(schedule, steps=train_steps, seed=seed)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    data = swiss_roll(n_samples, torch.Generator().manual_seed(seed + 1))
    metrics: dict[str, Any] = {"train_steps": train_steps, "train_seconds": round(train_s, 2),
                               "train_cpu_seconds": round(train_cpu_s, 2),
                               "final_loss": sum(losses[-100:]) / len(losses[-100:]),
                               "swd_data_vs_data": sliced_wasserstein(data, swiss_roll(n_samples, torch.Generator().manual_seed(seed + 2))),
                               "swd": {}}
    fig, axes = plt.subplots(len(samplers), len(step_counts) + 1, figsize=(2.2 * (len(step_counts) + 1), 2.2 * len(samplers)),
                             squeeze=False)
    for r, name in enumerate(samplers):
        axes[r][0].scatter(data[:, 0], data[:, 1], s=1, c="k")
        axes[r][0].set_title("data" if r == 0 else "", fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=9)
        metrics["swd"][name] = {}
        for c, steps in enumerate(step_counts, start=1):
            gen = torch.Generator().manual_seed(seed + 3)
            x_T = torch.randn(n_samples, 2, generator=gen)
            with torch.no_grad():
                xs = sample(model, x_T, schedule, steps, sampler=name, prediction_type="eps", generator=gen)
            swd = sliced_wasserstein(xs, data)
            metrics["swd"][name][str(steps)] = round(swd, 4)
            ax = axes[r][c]
            ax.scatter(xs[:, 0], xs[:, 1], s=1, c="tab:blue")
            ax.set_title(f"{steps} steps · SW {swd:.3f}", fontsize=8)
    for ax in (a for row in axes for a in row):
        ax.set_xlim(-2.2, 2.2)
        ax.set_ylim(-2.2, 2.2)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "swiss_roll.png", dpi=110)
    plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
