"""Toy problems that exercise the diffusion core end to end, with no images involved.

* :class:`GaussianData` -- x0 ~ N(μ, diag(s²)). Its exact denoiser is known in closed form:
  with x_t = α x0 + σ ε, E[ε | x_t] = σ (x_t − α μ)/(α² s² + σ²) (Gaussian conditioning), so every
  sampler can be checked against the true mean and variance (:func:`gaussian_error_table`).
* the swiss roll of the lecture notes: :func:`swiss_roll`, the data (its ε-model and the figure of every
  sampler live in ``ldm.modules.toy_mlp`` and ``ldm.evaluation.swiss_roll``: ``ldm toy --out DIR``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objectives import normalize_prediction_type, training_target
from ldm.diffusion.samplers import SAMPLERS, ModelFn, sample
from ldm.diffusion.schedules import DiscreteSchedule, NoiseSchedule, gaussian_posterior
from ldm.diffusion.sde import sample_probability_flow, sample_reverse_sde
from ldm.diffusion.variance import exact_reverse_raw_v


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

    def learned_variance_fn(self, schedule: NoiseSchedule, prediction_type: str = "eps") -> ModelFn:
        """The exact model with a learned variance (2C outputs, ``ldm.diffusion.variance``): the mean part of
        :meth:`model_fn` and the raw v whose eq. 15 variance is the true Var[x_{t−1} | x_t] of the step t → t − 1
        (to the data at t = 0): β̃ + c0² Var[x0 | x_t], with Var[x0 | x_t] = s² σ²/(α² s² + σ²). With it
        p_θ(x_{t−1} | x_t) = q(x_{t−1} | x_t) exactly, so the VLB is −log q(x0) up to the prior mismatch."""
        mean_fn = self.model_fn(schedule, prediction_type)

        def model(x: Tensor, t: Tensor) -> Tensor:
            alpha_t, sigma_t = schedule.alpha_sigma(t, like=x)
            prev = t - 1
            alpha_s, sigma_s = schedule.alpha_sigma(prev.clamp(min=0), like=x)
            data = (prev < 0).view(alpha_s.shape)
            alpha_s = torch.where(data, torch.ones_like(alpha_s), alpha_s)
            sigma_s = torch.where(data, torch.zeros_like(sigma_s), sigma_s)
            c0, _, small, large = gaussian_posterior(alpha_t, sigma_t, alpha_s, sigma_s)
            a1, s1 = (float(v) for v in schedule.alpha_sigma(torch.tensor(1)))
            a0, s0 = (float(v) for v in schedule.alpha_sigma(torch.tensor(0)))
            small = torch.where(data, torch.full_like(small, gaussian_posterior(a1, s1, a0, s0)[2]), small)
            _, s = self._stats(x)
            posterior_var = s**2 * sigma_t**2 / (alpha_t**2 * s**2 + sigma_t**2)
            true_var = (torch.where(data, torch.zeros_like(small), small) + c0**2 * posterior_var).expand_as(x)
            return torch.cat([mean_fn(x, t), exact_reverse_raw_v(true_var, small, large)], 1)

        return model

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """log q(x_t) of the marginal at (α, σ) (the data density by default), summed over dimensions."""
        mean, std = self.marginal(alpha, sigma)
        mean, std = mean.to(x), std.to(x)
        return (-0.5 * ((x - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def flow_log_prob(self, x: Tensor, schedule: NoiseSchedule, t_min: float = 0.0) -> Tensor:
        """log-density of x under the exact probability-flow model: the PF-ODE of this data keeps the standardized
        value z = (x − m_0)/sd_0 of the level-t_min marginal, so x(T) = m_T + sd_T z and
        log p(x) = log N(x(T); 0, prior_std² I) + Σ log(sd_T/sd_0) (change of variables). It differs from
        :meth:`log_prob` only by the prior's mismatch with the true marginal at T−1."""
        a0, s0 = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t_min), dtype=torch.float64)))
        aT, sT = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(schedule.num_train_timesteps - 1))))
        (m0, sd0), (mT, sdT) = self.marginal(a0, s0), self.marginal(aT, sT)
        x_T = mT.to(x) + sdT.to(x) * (x - m0.to(x)) / sd0.to(x)
        p = schedule.prior_std
        prior = (-0.5 * (x_T / p) ** 2 - math.log(p) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return prior + (sdT / sd0).log().sum().item()

    def entropy(self) -> float:
        """Differential entropy of the data, Σ ½ log(2πe s²) (nats)."""
        return float((0.5 * torch.log(2 * math.pi * math.e * self.std**2)).sum())

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
    return sample(model, x_T, schedule, steps, sampler=name, prediction_type="eps", spacing=spacing,
                  generator=generator)


def gaussian_error_table(mean: float = 0.5, std: float = 1.0, n: int = 100_000,
                         step_counts: tuple[int, ...] = (5, 10, 20, 50, 1000), spacing: str = "trailing",
                         seed: int = 0, schedule: DiscreteSchedule | None = None,
                         samplers: list[str] | None = None) -> list[dict[str, Any]]:
    """Mean and variance errors of every sampler (+ reverse SDE, PF-ODE; annealed Langevin only when named, its
    cost being 100 evaluations per level) for 1-D data N(mean, std²) with the exact model, started from the exact
    marginal at the first timestep.

    Deterministic samplers are affine maps for this model, so their output mean and variance are
    computed exactly from two points (no Monte-Carlo error, ``exact`` = True); stochastic ones use
    ``n`` samples (Monte-Carlo error ≈ 1/√n on the mean, √(2/n) on the variance)."""
    schedule = schedule or DiscreteSchedule.from_name("scaled_linear")
    data = GaussianData([mean], [std])
    rows = []
    # Langevin: 100 evaluations per level
    default = [n for n in SAMPLERS if n != "langevin"] + ["reverse-sde", "pf-ode"]
    for name in samplers or default:
        for steps in step_counts:
            t0 = (schedule.num_train_timesteps - 1 if name in ("reverse-sde", "pf-ode")
                  else schedule.timesteps(steps, spacing)[0].item())
            alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t0, dtype=torch.float64)))
            m_T, s_T = data.marginal(alpha, sigma)
            gen = torch.Generator().manual_seed(seed)
            if name in DETERMINISTIC:
                out = run_gaussian(name, data, schedule, steps, torch.stack([m_T, m_T + s_T]), spacing)
                out_mean, out_var = out[0], (out[1] - out[0]) ** 2
            else:
                out = run_gaussian(name, data, schedule, steps, data.sample_marginal(schedule, t0, n, gen),
                                   spacing, gen)
                out_mean, out_var = out.mean(0), out.var(0)
            rows.append({"sampler": name, "steps": steps, "exact": name in DETERMINISTIC,
                         "mean_err": ((out_mean - data.mean) / data.std).item(),
                         "var_err": (out_var / data.std**2 - 1).item()})
    return rows


def error_table_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pivot the error rows for display: one row per sampler, one "mean err / var err" (%) cell per step count."""
    steps = sorted({r["steps"] for r in rows})
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        row = out.setdefault(r["sampler"], {"sampler": r["sampler"] + ("" if r["exact"] else " (MC)")})
        row[f"{r['steps']} steps"] = f"{100 * r['mean_err']:+.1f} / {100 * r['var_err']:+.1f}"
    for row in out.values():
        for s in steps:
            row.setdefault(f"{s} steps", "")
    return list(out.values())


# ---- swiss roll --------------------------------------------------------------------------------------
SWISS_ROLL_U = (1.5 * math.pi, 4.5 * math.pi)
SWISS_ROLL_SCALE = 8.0


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.02) -> Tensor:
    """n points of the 2-D swiss roll (u ↦ u(cos u, sin u), u ∈ [1.5π, 4.5π]), scaled to unit-ish std."""
    u = SWISS_ROLL_U[0] + (SWISS_ROLL_U[1] - SWISS_ROLL_U[0]) * torch.rand(n, generator=generator)
    x = torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / SWISS_ROLL_SCALE
    return x + noise * torch.randn(n, 2, generator=generator)


def swiss_roll_log_density(points: Tensor, noise: float = 0.02, alpha: float = 1.0, sigma: float = 0.0,
                           nodes: int = 4000) -> Tensor:
    """log q_t(x) of the swiss roll's marginal x_t = α x_0 + σ ε at ``points`` (N, 2): the mixture over the curve
    ∫ p(u) N(x; α c(u), (α² noise² + σ²) I) du with u ~ U[1.5π, 4.5π], by the midpoint rule on ``nodes`` nodes
    (log-sum-exp; accurate once the node spacing along the curve is below the kernel width)."""
    lo, hi = SWISS_ROLL_U
    u = lo + (hi - lo) * (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes
    centres = alpha * torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / SWISS_ROLL_SCALE
    var = alpha**2 * noise**2 + sigma**2
    out = []
    for chunk in points.double().split(1024):  # bounded memory: (1024, nodes) at a time
        log_kernel = -torch.cdist(chunk, centres).pow(2) / (2 * var) - math.log(2 * math.pi * var)
        out.append(torch.logsumexp(log_kernel, 1) - math.log(nodes))
    return torch.cat(out).to(points.dtype)
