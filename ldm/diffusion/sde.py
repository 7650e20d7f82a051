"""The SDE view of a schedule (Song et al. 2021b) and two continuous-time samplers.

The VP-SDE dx = −½ β(τ) x dτ + √β(τ) dW (Song et al. 2021b, eq. 11) is the continuous limit of DDPM's
chain; the VE-SDE dx = √(dσ²/dτ) dW (eq. 9) that of SMLD/NCSN's noise ladder. Here time τ is measured in
the schedule's own timestep units, τ ∈ [0, T−1], so a denoiser trained on integer t is asked at fractional
τ directly, and the SDE is chosen so that its marginals are exactly the schedule's: σ̄(τ) = σ/α follows the
log-σ̄ interpolation of ``NoiseSchedule.sigma_at`` (piecewise linear in log σ̄), which matches the tables at
integer τ (for VP, β(τ) ≈ β_t per unit of τ: the discrete step is one unit; for VE, the geometric σ(τ)).

Samplers (both end with the denoised x̂0 at τ = 0, Song et al. 2021b App. G, "denoising"):

* :func:`sample_reverse_sde`: Euler–Maruyama on the reverse-time SDE (Anderson 1982; Song et al. 2021b eq. 6),
* :func:`sample_probability_flow`: Heun on the probability-flow ODE (Song et al. 2021b eq. 13).

Both pick the SDE of the schedule's kind (:func:`sde_for`). The score comes from an eps (or v/x0) model:
∇ log p_τ(x) = −ε̂/σ_τ (Song et al. 2021b, App. B / eq. 29 kernel; Vincent 2011).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.objectives import normalize_prediction_type, standard_normal
from ldm.diffusion.samplers import Callback, ModelFn, Predictor, report_step, step_range
from ldm.diffusion.schedules import NoiseSchedule


class ScheduleSDE:
    """The interface of :class:`VPSDE` and :class:`VESDE`: marginals, drift and diffusion, score."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        self.t_max = float(schedule.num_train_timesteps - 1)
        self.t_min = 0.0

    def marginal(self, tau: float) -> tuple[float, float]:
        """Perturbation kernel p_{0τ}(x | x0) = N(α(τ) x0, σ(τ)² I) (Song et al. 2021b eq. 29, 31): (α, σ)."""
        alpha, sigma = self.schedule.alpha_sigma(torch.tensor(float(tau), dtype=torch.float64))
        return float(alpha), float(sigma)

    def log_sigma_slope(self, tau: float) -> float:
        """d log σ̄/dτ, constant on [k, k+1] (σ̄ = σ/α is interpolated linearly in log between integer steps)."""
        T = self.schedule.num_train_timesteps
        k = min(max(int(math.floor(tau)), 0), T - 2)
        table = self.schedule.log_sigmas
        return float(table[k + 1] - table[k])

    def drift_diffusion(self, x: Tensor, tau: float) -> tuple[Tensor, float]:
        """f(x, τ) and g(τ) of dx = f dτ + g dW."""
        raise NotImplementedError

    def score(self, predict: Predictor, x: Tensor, tau: float) -> Tensor:
        """∇_x log p_τ(x) ≈ −ε̂(x, τ)/σ(τ) for a model of any prediction type."""
        alpha, sigma = self.marginal(tau)
        _, eps = predict(x, tau, alpha, sigma)
        return -eps / sigma

    def reverse_drift(self, predict: Predictor, x: Tensor, tau: float, probability_flow: bool) -> Tensor:
        """dx/dτ of the reverse SDE, f − g² ∇log p (eq. 6, noise term apart), or of the PF-ODE,
        f − ½ g² ∇log p (eq. 13)."""
        f, g = self.drift_diffusion(x, tau)
        weight = 0.5 if probability_flow else 1.0
        return f - weight * g**2 * self.score(predict, x, tau)


class VPSDE(ScheduleSDE):
    """Drift, diffusion, marginals and score conversion of the VP-SDE matching a VP ``schedule``."""

    def beta(self, tau: float) -> float:
        """β(τ) = −d log ᾱ/dτ. With ℓ = log σ̄ linear on [k, k+1] and ᾱ = 1/(1 + e^{2ℓ}),
        β = 2 (1 − ᾱ(τ)) dℓ/dτ; on [k, k+1] the integral of β is −log(ᾱ_{k+1}/ᾱ_k), DDPM's step."""
        _, sigma = self.marginal(tau)
        return 2 * sigma**2 * self.log_sigma_slope(tau)

    def drift_diffusion(self, x: Tensor, tau: float) -> tuple[Tensor, float]:
        """f(x, τ) = −½ β(τ) x and g(τ) = √β(τ) (Song et al. 2021b eq. 11)."""
        beta = self.beta(tau)
        return -0.5 * beta * x, math.sqrt(beta)


class VESDE(ScheduleSDE):
    """The VE-SDE dx = √(dσ²/dτ) dW (Song et al. 2021b eq. 9) whose marginals are a VE ``schedule``'s."""

    def drift_diffusion(self, x: Tensor, tau: float) -> tuple[Tensor, float]:
        """f = 0 and g(τ) = √(dσ²/dτ) = σ(τ) √(2 d log σ/dτ) (eq. 9; for the geometric σ(τ) of eq. 31 this is
        σ √(2 log(σ_max/σ_min)) per unit of normalized time)."""
        _, sigma = self.marginal(tau)
        return torch.zeros_like(x), sigma * math.sqrt(2 * self.log_sigma_slope(tau))


def sde_for(schedule: NoiseSchedule) -> ScheduleSDE:
    """The SDE whose marginals are ``schedule``'s: :class:`VPSDE` or :class:`VESDE` by its kind."""
    kinds = {"vp": VPSDE, "ve": VESDE}
    if schedule.kind not in kinds:
        raise ValueError(f"no SDE for a schedule of kind {schedule.kind!r}")
    return kinds[schedule.kind](schedule)


def _uniform_grid(sde: ScheduleSDE, steps: int) -> list[float]:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return torch.linspace(sde.t_max, sde.t_min, int(steps) + 1, dtype=torch.float64).tolist()


def _denoise(predict: Predictor, sde: ScheduleSDE, x: Tensor) -> Tensor:
    alpha, sigma = sde.marginal(sde.t_min)
    return predict(x, sde.t_min, alpha, sigma)[0]


def sample_reverse_sde(model_fn: ModelFn, x_T: Tensor, schedule: NoiseSchedule, steps: int,
                       prediction_type: str | None = None, generator: torch.Generator | None = None,
                       callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE dx = [f − g² ∇log p_τ] dτ + g dW̄ (Song et al. 2021b eq. 6)
    over ``steps`` uniform steps from τ = T−1 to 0, then the x̂0 denoising step (``steps`` + 1 evaluations).
    ``x_T`` is a sample of the marginal at τ = T−1, as for the discrete samplers."""
    sde = sde_for(schedule)
    grid = _uniform_grid(sde, steps)
    predict = Predictor(model_fn, normalize_prediction_type(prediction_type or schedule.prediction_type), x_T)
    x = x_T
    with torch.no_grad():
        for i in step_range(len(grid) - 1, progress, "reverse-sde"):
            dt = grid[i] - grid[i + 1]
            drift = sde.reverse_drift(predict, x, grid[i], probability_flow=False)
            g = sde.drift_diffusion(x, grid[i])[1]
            x = x - drift * dt + g * math.sqrt(dt) * standard_normal(x.shape, x, generator)
            report_step(callback, i, grid[i], x, x)
        return _denoise(predict, sde, x)


def sample_probability_flow(model_fn: ModelFn, x_T: Tensor, schedule: NoiseSchedule, steps: int,
                            prediction_type: str | None = None, callback: Callback | None = None,
                            progress: bool = False) -> Tensor:
    """Heun (2nd-order trapezoid) on the probability-flow ODE dx/dτ = f − ½ g² ∇log p_τ
    (Song et al. 2021b eq. 13), ``steps`` uniform steps from τ = T−1 to 0, then the x̂0 denoising step
    (2·steps + 1 evaluations). Deterministic: equal inputs give equal outputs."""
    sde = sde_for(schedule)
    grid = _uniform_grid(sde, steps)
    predict = Predictor(model_fn, normalize_prediction_type(prediction_type or schedule.prediction_type), x_T)
    x = x_T
    with torch.no_grad():
        for i in step_range(len(grid) - 1, progress, "pf-ode"):
            dt = grid[i + 1] - grid[i]  # negative: integrating backwards in τ
            d = sde.reverse_drift(predict, x, grid[i], probability_flow=True)
            x_euler = x + dt * d
            d_next = sde.reverse_drift(predict, x_euler, grid[i + 1], probability_flow=True)
            x = x + dt * 0.5 * (d + d_next)
            report_step(callback, i, grid[i], x, x)
        return _denoise(predict, sde, x)
