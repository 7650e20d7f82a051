"""Toy problems that exercise the diffusion core end to end, with no images involved.

* :class:`GaussianData` -- x0 ~ N(μ, diag(s²)). Its exact denoiser is known in closed form:
  with x_t = α x0 + σ ε, E[ε | x_t] = σ (x_t − α μ)/(α² s² + σ²) (Gaussian conditioning), so every
  sampler can be checked against the true mean and variance (:func:`gaussian_error_table`).
* the swiss roll of the lecture notes: :func:`swiss_roll`, a small MLP ε-model (:class:`ToyMLP`,
  :func:`train_toy`) and :func:`run_toy`, which samples it with every sampler at several step counts
  and writes a figure (``ldm toy --out DIR``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion.objectives import diffusion_loss, normalize_prediction_type, training_target
from ldm.diffusion.samplers import SAMPLERS, ModelFn, sample
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.sde import sample_probability_flow, sample_reverse_sde


# ---- Gaussian data: exact denoisers ----------------------------------------------------------------
@dataclass
class GaussianData:
    """x0 ~ N(mean, diag(std²)) in ``len(mean)`` dimensions."""

    mean: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean, dtype=torch.float64)
        self.std = torch.as_tensor(self.std, dtype=torch.float64)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.to(like), self.std.to(like)

    def marginal(self, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """Mean and std of x_t = α x0 + σ ε: (α μ, √(α² s² + σ²)) (DDPM eq. 4)."""
        return alpha * self.mean, (alpha**2 * self.std**2 + sigma**2).sqrt()

    def sample_marginal(self, schedule: DiscreteSchedule, t: float, n: int, generator: torch.Generator,
                        dtype: torch.dtype = torch.float64) -> Tensor:
        """n draws of x_t ~ q(x_t) at timestep ``t`` (what a sampler should start from)."""
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        mean, std = self.marginal(alpha, sigma)
        z = torch.randn(n, len(self.mean), generator=generator, dtype=torch.float64)
        return (mean + std * z).to(dtype)

    def model_fn(self, schedule: DiscreteSchedule, prediction_type: str = "eps") -> ModelFn:
        """The exact (MMSE) denoiser E[target | x_t] for target ε, v or x0; linear, so the conversions
        of objectives.training_target carry E[·] through exactly."""
        kind = normalize_prediction_type(prediction_type)

        def model(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma = _coefficients(schedule, t, x)
            mu, s = self._stats(x)
            eps = sigma * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)
            x0 = mu + alpha * s**2 * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)
            return training_target(x0, eps, alpha, sigma, kind)

        return model

    def consistency_fn(self, schedule: DiscreteSchedule) -> ModelFn:
        """The exact consistency function (x0-type output): the PF-ODE maps x_t to
        x0 = μ + s (x_t − α μ)/√(α² s² + σ²), since it keeps the standardized value fixed."""

        def model(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma = _coefficients(schedule, t, x)
            mu, s = self._stats(x)
            return mu + s * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2).sqrt()

        return model


def _coefficients(schedule: DiscreteSchedule, t: Tensor, x: Tensor) -> tuple[Any, Any]:
    """(α_t, σ_t) for the batch: python floats when all t are equal (samplers' case, and fast)."""
    if t.numel() > 0 and bool((t == t[0]).all()):
        alpha, sigma = schedule.alpha_sigma(t[:1].to("cpu", torch.float64))
        return float(alpha), float(sigma)
    return schedule.alpha_sigma(t, like=x)


def moment_errors(samples: Tensor, data: GaussianData) -> tuple[float, float]:
    """(max |mean error| / std, max |relative variance error|) over dimensions."""
    x = samples.double()
    mean_err = ((x.mean(0) - data.mean) / data.std).abs().max().item()
    var_err = (x.var(0) / data.std**2 - 1).abs().max().item()
    return mean_err, var_err


DETERMINISTIC = ("ddim", "dpmpp-2m", "euler", "heun", "pf-ode")


def run_gaussian(name: str, data: GaussianData, schedule: DiscreteSchedule, steps: int, x_T: Tensor,
                 spacing: str = "trailing", generator: torch.Generator | None = None) -> Tensor:
    """Run sampler ``name`` (a key of SAMPLERS, or "reverse-sde" / "pf-ode") with the exact Gaussian model;
    LCM gets the exact consistency function (x0-type; it is the whole f, so no boundary scalings on top),
    the others the exact eps-model."""
    if name == "lcm":
        return sample(data.consistency_fn(schedule), x_T, schedule, steps, sampler="lcm", prediction_type="x0",
                      spacing=spacing, generator=generator, boundary_condition=False)
    model = data.model_fn(schedule, "eps")
    if name == "reverse-sde":
        return sample_reverse_sde(model, x_T, schedule, steps, "eps", generator=generator)
    if name == "pf-ode":
        return sample_probability_flow(model, x_T, schedule, steps, "eps")
    return sample(model, x_T, schedule, steps, sampler=name, prediction_type="eps", spacing=spacing, generator=generator)


def gaussian_error_table(mean: float = 0.5, std: float = 1.0, n: int = 100_000,
                         step_counts: tuple[int, ...] = (5, 10, 20, 50, 1000), spacing: str = "trailing",
                         seed: int = 0, schedule: DiscreteSchedule | None = None,
                         samplers: list[str] | None = None) -> list[dict[str, Any]]:
    """Mean and variance errors of every sampler (+ reverse SDE, PF-ODE) for 1-D data N(mean, std²) with
    the exact model, started from the exact marginal at the first timestep.

    Deterministic samplers are affine maps for this model, so their output mean and variance are
    computed exactly from two points (no Monte-Carlo error, ``exact`` = True); stochastic ones use
    ``n`` samples (Monte-Carlo error ≈ 1/√n on the mean, √(2/n) on the variance)."""
    schedule = schedule or DiscreteSchedule.from_name("scaled_linear")
    data = GaussianData([mean], [std])
    rows = []
    for name in samplers or list(SAMPLERS) + ["reverse-sde", "pf-ode"]:
        for steps in step_counts:
            t0 = schedule.num_train_timesteps - 1 if name in ("reverse-sde", "pf-ode") else schedule.timesteps(steps, spacing)[0].item()
            alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t0, dtype=torch.float64)))
            m_T, s_T = data.marginal(alpha, sigma)
            gen = torch.Generator().manual_seed(seed)
            if name in DETERMINISTIC:
                out = run_gaussian(name, data, schedule, steps, torch.stack([m_T, m_T + s_T]), spacing)
                out_mean, out_var = out[0], (out[1] - out[0]) ** 2
            else:
                out = run_gaussian(name, data, schedule, steps, data.sample_marginal(schedule, t0, n, gen), spacing, gen)
                out_mean, out_var = out.mean(0), out.var(0)
            rows.append({"sampler": name, "steps": steps, "exact": name in DETERMINISTIC,
                         "mean_err": ((out_mean - data.mean) / data.std).item(),
                         "var_err": (out_var / data.std**2 - 1).item()})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: rows = samplers, columns = steps, cells = "mean err / var err" in % (signed)."""
    steps = sorted({r["steps"] for r in rows})
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    exact = {r["sampler"]: r["exact"] for r in rows}
    cell = {(r["sampler"], r["steps"]): f"{100 * r['mean_err']:+.1f} / {100 * r['var_err']:+.1f}" for r in rows}
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    lines += [f"| {n}{'' if exact[n] else ' (MC)'} | " + " | ".join(cell.get((n, s), "") for s in steps) + " |"
              for n in names]
    return "\n".join(lines)


# ---- swiss roll --------------------------------------------------------------------------------------
def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.02) -> Tensor:
    """n points of the 2-D swiss roll (u ↦ u(cos u, sin u), u ∈ [1.5π, 4.5π]), scaled to unit-ish std."""
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / 8.0
    return x + noise * torch.randn(n, 2, generator=generator)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps (Vaswani et al. 2017 §3.5, as in DDPM's U-Net)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


class ToyMLP(nn.Module):
    """ε-model for 2-D points: [Fourier features of x, emb(t)] → SiLU MLP → 2 numbers.

    Each coordinate goes through the sinusoidal embedding at scale ``x_scale`` (Fourier features,
    Tancik et al. 2020): a plain MLP on raw (x, y) learns the thin spiral far more slowly."""

    def __init__(self, hidden: int = 128, depth: int = 3, emb_dim: int = 32, x_scale: float = 25.0) -> None:
        super().__init__()
        self.emb_dim, self.x_scale = emb_dim, x_scale
        layers: list[nn.Module] = [nn.Linear(3 * emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε̂(x_t, t) for points x (B, 2) and float timesteps t (B,)."""
        features = [timestep_embedding(x[:, i] * self.x_scale, self.emb_dim) for i in range(2)]
        h = torch.cat(features + [timestep_embedding(t, self.emb_dim)], 1)
        return self.net(h).to(x.dtype)


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
