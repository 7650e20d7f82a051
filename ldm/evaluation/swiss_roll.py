"""The swiss roll of the lecture notes end to end: train the toy ε-model, sample it with every sampler at several
step counts, and draw the figure ``ldm toy`` writes (with sliced Wasserstein distances to held-out data).

:func:`score_views` adds the score-based side (``score_views.png``): a VE-schedule model trained by σ²-weighted
denoising score matching (Song & Ermon 2019) sampled with annealed Langevin dynamics and with VE predictor–corrector
(Song et al. 2021b), and the density of the VP model by its probability-flow ODE (Song et al. 2021b eq. 39) beside
the true density of the same noise level, with both held-out negative log-likelihoods."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objectives import diffusion_loss
from ldm.diffusion.ode_likelihood import ode_log_likelihood
from ldm.diffusion.samplers import SAMPLERS, ModelFn, sample
from ldm.diffusion.schedules import DiscreteSchedule, NoiseSchedule, VESchedule, VEScheduleConfig
from ldm.diffusion.toy import swiss_roll, swiss_roll_log_density
from ldm.modules.toy_mlp import ToyMLP


def model_fn_of(model: ToyMLP, schedule: NoiseSchedule) -> ModelFn:
    """The samplers' ``model_fn(x_t, t)`` of a toy network: it sees ``schedule.scale_model_input(x_t, t)``."""
    return lambda x, t: model(schedule.scale_model_input(x, t), t)


def train_toy(schedule: NoiseSchedule, steps: int = 4000, batch_size: int = 256, lr: float = 5e-3,
              seed: int = 0, prediction_type: str = "eps", hidden: int = 128) -> tuple[ToyMLP, list[float]]:
    """Fit a :class:`ToyMLP` to the swiss roll with L_simple (DDPM Algorithm 1 / eq. 14; on a VE schedule the same
    ε-MSE is σ²-weighted denoising score matching, ``objectives.dsm_loss``); returns the model (eval mode) and the
    loss curve."""
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
        x_t = schedule.q_sample(x0, t, noise)
        loss = diffusion_loss(model(schedule.scale_model_input(x_t, t), t.float()), x0, noise, t, schedule,
                              prediction_type)
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
            train_steps: int = 4000, n_samples: int = 2000, seed: int = 0, schedule_name: str = "scaled_linear",
            score: bool = False, score_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the swiss-roll model, sample it with each sampler × step count, and write
    ``swiss_roll.png`` (data vs samples grid) and ``metrics.json`` (sliced W1 to held-out data) to ``out_dir``;
    with ``score`` also :func:`score_views` (``score_views.png``, metrics under "score_views")."""
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
                               "swd_data_vs_data": sliced_wasserstein(
                                   data, swiss_roll(n_samples, torch.Generator().manual_seed(seed + 2))),
                               "swd": {}}
    fig, axes = plt.subplots(len(samplers), len(step_counts) + 1,
                             figsize=(2.2 * (len(step_counts) + 1), 2.2 * len(samplers)), squeeze=False)
    for r, name in enumerate(samplers):
        axes[r][0].scatter(data[:, 0], data[:, 1], s=1, c="k")
        axes[r][0].set_title("data" if r == 0 else "", fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=9)
        metrics["swd"][name] = {}
        for c, steps in enumerate(step_counts, start=1):
            gen = torch.Generator().manual_seed(seed + 3)
            x_T = torch.randn(n_samples, 2, generator=gen)
            with torch.no_grad():
                xs = sample(model_fn_of(model, schedule), x_T, schedule, steps, sampler=name, prediction_type="eps",
                            generator=gen)
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
    if score:
        metrics["score_views"] = score_views(out, model, schedule, train_steps=train_steps, n_samples=n_samples,
                                             seed=seed, **(score_options or {}))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# σ_max ≈ the largest pairwise distance (Song & Ermon 2019 §4.2)
TOY_VE = VEScheduleConfig(sigma_min=0.01, sigma_max=4.0)


def score_views(out_dir: str | Path, vp_model: ToyMLP, vp_schedule: DiscreteSchedule, train_steps: int = 4000,
                n_samples: int = 2000, seed: int = 0, langevin_levels: int = 20, langevin_steps: int = 100,
                pc_steps: int = 200, grid: int = 100, ode_steps: int = 40) -> dict[str, Any]:
    """Train a VE toy model, sample it with annealed Langevin and VE-PC, and map the VP model's PF-ODE density on a
    ``grid``² lattice beside the true density of its τ = 0 level; writes ``score_views.png``, returns the metrics
    (sliced W1 of the samples; held-out NLL in nats per point under the ODE model and under the true density)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ve = VESchedule(TOY_VE)
    cpu = time.process_time()
    ve_model, ve_losses = train_toy(ve, steps=train_steps, seed=seed)
    data = swiss_roll(n_samples, torch.Generator().manual_seed(seed + 1))
    fn = model_fn_of(ve_model, ve)
    panels: dict[str, Tensor] = {}
    metrics: dict[str, Any] = {"ve_train_cpu_seconds": round(time.process_time() - cpu, 2),
                               "ve_final_loss": sum(ve_losses[-100:]) / len(ve_losses[-100:]), "swd": {}}
    runs = {"langevin": dict(steps=langevin_levels, spacing="geometric", n_steps_each=langevin_steps, step_scale=0.5),
            "ve-pc": dict(steps=pc_steps, sampler="pc")}
    for name, options in runs.items():
        gen = torch.Generator().manual_seed(seed + 3)
        x_T = ve.prior_std * torch.randn(n_samples, 2, generator=gen)
        sampler = options.pop("sampler", "langevin")
        with torch.no_grad():
            panels[name] = sample(fn, x_T, ve, generator=gen, sampler=sampler, prediction_type="eps", **options)
        metrics["swd"][name] = round(sliced_wasserstein(panels[name], data), 4)
    # PF-ODE density of the VP model vs the true density of the level it models (τ = 0)
    alpha0, sigma0 = (float(v) for v in vp_schedule.alpha_sigma(torch.tensor(0)))
    axis = torch.linspace(-2.2, 2.2, grid)
    points = torch.stack(torch.meshgrid(axis, axis.flip(0), indexing="xy"), -1).reshape(-1, 2)
    vp_fn = model_fn_of(vp_model, vp_schedule)
    cpu = time.process_time()
    ode_grid = ode_log_likelihood(vp_fn, points, vp_schedule, method="rk4", steps=ode_steps, exact=True)
    true_grid = swiss_roll_log_density(points, alpha=alpha0, sigma=sigma0)
    held_out = swiss_roll(n_samples, torch.Generator().manual_seed(seed + 2))
    noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(seed + 4))
    x_level0 = alpha0 * held_out + sigma0 * noise
    ode_held = ode_log_likelihood(vp_fn, x_level0, vp_schedule, method="rk4", steps=ode_steps, exact=True)
    cell = (4.4 / (grid - 1)) ** 2
    metrics.update(ode_cpu_seconds=round(time.process_time() - cpu, 2), ode_nfe=ode_grid.nfe,
                   ode_grid_mass=round(float(ode_grid.log_p.exp().sum() * cell), 4),  # ≈ 1: a normalized density
                   true_grid_mass=round(float(true_grid.exp().sum() * cell), 4),
                   ode_nll_nats=round(-ode_held.log_p.mean().item(), 4),
                   true_nll_nats=round(-swiss_roll_log_density(x_level0, alpha=alpha0, sigma=sigma0).mean().item(), 4),
                   level0_sigma=round(sigma0 / alpha0, 4))
    fig, axes = plt.subplots(1, 5, figsize=(11.5, 2.6))
    scatters = [("data", data), (f"annealed Langevin (VE) · SW {metrics['swd']['langevin']:.3f}", panels["langevin"]),
                (f"VE predictor-corrector · SW {metrics['swd']['ve-pc']:.3f}", panels["ve-pc"])]
    for ax, (title, xs) in zip(axes[:3], scatters):
        ax.scatter(xs[:, 0], xs[:, 1], s=1, c="k" if title == "data" else "tab:blue")
        ax.set_title(title, fontsize=7)
        ax.set_xlim(-2.2, 2.2)
        ax.set_ylim(-2.2, 2.2)
    for ax, (title, logp) in zip(axes[3:], [(f"true log q (τ=0) · NLL {metrics['true_nll_nats']:.2f}", true_grid),
                                           (f"PF-ODE log p · NLL {metrics['ode_nll_nats']:.2f}", ode_grid.log_p)]):
        top = logp.max().item()  # each map over its own top 6 nats
        ax.imshow(logp.reshape(grid, grid).clamp(min=top - 6).numpy(), extent=(-2.2, 2.2, -2.2, 2.2), cmap="magma",
                  vmin=top - 6, vmax=top)
        ax.set_title(title, fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "score_views.png", dpi=110)
    plt.close(fig)
    return metrics
