"""Samplers: functions of (model_fn, x, schedule, timesteps), each a short loop that mirrors its paper.

``model_fn(x_t, t) -> output`` is the raw denoiser: ``t`` is a float tensor of shape (B,) of (possibly
fractional) timesteps in [0, T−1] and ``output`` is of the given ``prediction_type`` ("eps", "v", "x0").
Every sampler converts the output to ``(x̂0, ε̂)`` (objectives.predict_x0_eps) and steps along the
descending ``timesteps`` t_0 > ... > t_{N−1}; the last step always lands on clean data (ᾱ = 1, σ = 0),
so N is the number of steps (model evaluations, except Heun's 2N−1).

The input ``x`` is a sample at t_0 in the VP scaling of DDPM eq. 4 (standard normal noise for a
zero-terminal-SNR schedule started at T−1; standard normal is the usual approximation otherwise).
Device and dtype come from ``x``; noise comes from ``generator`` (any device), so runs are reproducible.
Sigma-space samplers (euler, euler-a, heun) work on x/α with σ = √((1−ᾱ)/ᾱ) (Karras et al. 2022).

``sample(...)`` is the single entry point; ``SAMPLERS`` maps names to the functions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objectives import consistency_scalings, normalize_prediction_type, predict_x0_eps, standard_normal
from ldm.diffusion.schedules import NoiseSchedule, gaussian_posterior
from ldm.diffusion.variance import VARIANCE_TYPES, split_output, step_log_variance

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
DDPM_VARIANCES = VARIANCE_TYPES


@dataclass
class Grid:
    """One run's discretization: model timesteps ``ts`` (N) and, per level, the ``alphas``/``sigmas`` of
    q(x_t | x_0) and the sigma-space ``ve_sigmas`` σ̄ = σ/α with the α that goes with them, ``ve_alphas``
    (N + 1 each; the extra last level is clean data: 1, 0, 0, 1). ``ve_alphas`` differs from ``alphas``
    only at zero terminal SNR, where σ̄ is floored (schedules' module doc)."""

    ts: list[float]
    alphas: list[float]
    sigmas: list[float]
    ve_sigmas: list[float]
    ve_alphas: list[float]

    @classmethod
    def build(cls, schedule: NoiseSchedule, timesteps: Tensor) -> Grid:
        """Look the timesteps up once (float64 on CPU) so each step's coefficients are plain floats."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
        alpha, sigma = schedule.alpha_sigma(ts)
        ve = schedule.sigma_at(ts)
        ve_alpha = schedule.alpha_sigma_of(ve.log())[0]
        return cls(ts.tolist(), alpha.tolist() + [1.0], sigma.tolist() + [0.0], ve.tolist() + [0.0],
                   ve_alpha.tolist() + [1.0])

    def __len__(self) -> int:
        return len(self.ts)


class Predictor:
    """Calls ``model_fn`` at one timestep for a whole batch and returns ``(x̂0, ε̂)``.

    A model may output 2C channels for C-channel x: the mean part and a learned variance v
    (``ldm.diffusion.variance``); samplers use the mean part, :meth:`full` also returns v."""

    def __init__(self, model_fn: ModelFn, prediction_type: str, like: Tensor) -> None:
        self.model_fn = model_fn
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.t_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32

    def full(self, x: Tensor, t: float, alpha: float, sigma: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x̂0, ε̂, raw v or None)`` at timestep ``t`` for x_t = ``x``."""
        tt = torch.full((x.shape[0],), t, dtype=self.t_dtype, device=x.device)
        out = self.model_fn(x, tt)
        same = out.shape == x.shape
        doubled = x.ndim > 1 and out.shape == (x.shape[0], 2 * x.shape[1], *x.shape[2:])
        if not (same or doubled):
            raise ValueError(f"model_fn returned shape {tuple(out.shape)} for input {tuple(x.shape)}; it must match "
                             "(or have twice the channels: mean and learned variance)")
        mean, v = split_output(out.to(x.dtype), x.shape[1]) if doubled else (out.to(x.dtype), None)
        return (*predict_x0_eps(mean, x, alpha, sigma, self.prediction_type), v)

    def __call__(self, x: Tensor, t: float, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        return self.full(x, t, alpha, sigma)[:2]

    def sigma_space(self, x_ve: Tensor, t: float, ve_sigma: float, ve_alpha: float) -> Tensor:
        """The denoiser D(x̄; σ̄) of Karras et al. 2022 (eq. 7's x̂0) for x̄ = x/α: returns x̂0."""
        return self(x_ve * ve_alpha, t, ve_alpha, ve_sigma * ve_alpha)[0]


def step_range(n: int, progress: bool, desc: str) -> Iterable[int]:
    """``range(n)``, with a progress bar when asked."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc)


def report_step(callback: Callback | None, i: int, t: float, x: Tensor, x0: Tensor) -> None:
    """Tell ``callback`` (if any) about step ``i``: its time, the current sample and its x̂0."""
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})


# ---- VP (discrete-time) samplers -------------------------------------------------------------------
def sample_ddpm(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                prediction_type: str = "eps", generator: torch.Generator | None = None,
                variance: str | None = None, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2: x_s ~ N(μ̃(x_t, x̂0), Σ) with μ̃ from eq. 7 and Σ = β̃
    ("fixed_small", eq. 7), β ("fixed_large", §3.2) or the learned exp(v log β + (1 − v) log β̃) of a model
    with 2C outputs ("learned", Nichol & Dhariwal 2021 eq. 15; the default for such a model, else
    fixed_small). Strided steps use the respaced β_{t|s} = 1 − ᾱ_t/ᾱ_s and β̃_{t|s} (iDDPM §4), through
    ``schedules.gaussian_posterior`` (any VP or VE schedule). No noise on the last step (Algorithm 2, z = 0)."""
    if variance is not None and variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}: use one of {list(DDPM_VARIANCES)}")
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    for i in step_range(len(g), progress, "ddpm"):
        x0, _, v = predict.full(x, g.ts[i], g.alphas[i], g.sigmas[i])
        kind = variance or ("learned" if v is not None else "fixed_small")
        c0, ct, var_small, var_large = gaussian_posterior(g.alphas[i], g.sigmas[i], g.alphas[i + 1], g.sigmas[i + 1])
        x = c0 * x0 + ct * x
        if i < len(g) - 1 and var_small > 0:
            log_var = step_log_variance(kind, v, var_small, var_large, var_small)
            std = torch.exp(0.5 * log_var) if isinstance(log_var, Tensor) else math.exp(0.5 * log_var)
            x = x + std * standard_normal(x.shape, x, generator)
        report_step(callback, i, g.ts[i], x, x0)
    return x


def sample_ddim(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                prediction_type: str = "eps", generator: torch.Generator | None = None, eta: float = 0.0,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DDIM, Song et al. 2021a eq. 12: x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ²) ε̂ + σ z with
    σ = η √((1−ᾱ_s)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_s) (eq. 16). η = 0 is deterministic; η = 1 is DDPM with β̃."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    for i in step_range(len(g), progress, "ddim"):
        x0, eps = predict(x, g.ts[i], g.alphas[i], g.sigmas[i])
        var = eta**2 * gaussian_posterior(g.alphas[i], g.sigmas[i], g.alphas[i + 1], g.sigmas[i + 1])[2]
        x = g.alphas[i + 1] * x0 + math.sqrt(max(g.sigmas[i + 1] ** 2 - var, 0.0)) * eps
        if var > 0:
            x = x + math.sqrt(var) * standard_normal(x.shape, x, generator)
        report_step(callback, i, g.ts[i], x, x0)
    return x


@torch.no_grad()
def ddim_invert(model_fn: ModelFn, x0: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                prediction_type: str = "eps", fixed_point_iters: int = 0,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Encode clean ``x0`` to x at ``timesteps[0]`` by running DDIM (η = 0, eq. 12) backwards along the
    same grid (clean → t_{N−1} → ... → t_0), so that ``sample_ddim`` on the result decodes it again.

    Each step uses ε̂ at the current, less noisy point (the usual approximation; at the clean start the
    model is asked at t_{N−1}). ``fixed_point_iters`` > 0 re-evaluates ε̂ at the new point and re-solves
    the DDIM step, which converges to the exact inverse of the deterministic sampler.
    """
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x0)
    x, n = x0, len(g)
    for k in step_range(n, progress, "ddim-invert"):
        cur, nxt = n - k, n - k - 1  # level indices; level n is clean data
        t_eval = g.ts[min(cur, n - 1)]
        a_eval, s_eval = (g.alphas[cur], g.sigmas[cur]) if cur < n else (g.alphas[n - 1], g.sigmas[n - 1])
        _, eps = predict(x, t_eval, a_eval, s_eval)
        x_next = g.alphas[nxt] * (x - g.sigmas[cur] * eps) / g.alphas[cur] + g.sigmas[nxt] * eps
        for _ in range(fixed_point_iters):
            _, eps = predict(x_next, g.ts[nxt], g.alphas[nxt], g.sigmas[nxt])
            x_next = g.alphas[nxt] * (x - g.sigmas[cur] * eps) / g.alphas[cur] + g.sigmas[nxt] * eps
        x0_hat = (x - g.sigmas[cur] * eps) / g.alphas[cur]
        x = x_next
        report_step(callback, k, g.ts[nxt], x, x0_hat)
    return x


def sample_dpmpp_2m(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                    prediction_type: str = "eps", generator: torch.Generator | None = None,
                    callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (data prediction, multistep, second order).

    With λ = log(α/σ) and h_i = λ_{i+1} − λ_i:
    x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h_i} − 1) D_i, where D_i = x̂0_i on the first step
    (DPM-Solver++(1) = DDIM) and D_i = (1 + 1/(2r)) x̂0_i − 1/(2r) x̂0_{i−1}, r = h_{i−1}/h_i, after it.
    The final step to σ = 0 is first order (h = ∞: it returns x̂0), as diffusers' lower_order_final.
    """
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    lam = [math.log(a / s) if a > 0 and s > 0 else (math.inf if s == 0 else -math.inf)
           for a, s in zip(g.alphas, g.sigmas)]
    x0_prev, h_prev = None, None
    for i in step_range(len(g), progress, "dpmpp-2m"):
        x0, _ = predict(x, g.ts[i], g.alphas[i], g.sigmas[i])
        h = lam[i + 1] - lam[i]
        final = g.sigmas[i + 1] == 0
        if x0_prev is None or final:
            d = x0
        else:
            half_inv_r = 0.5 * h / h_prev  # 1/(2r); 0 when the previous step was infinite (from pure noise)
            d = (1 + half_inv_r) * x0 - half_inv_r * x0_prev
        ratio = g.sigmas[i + 1] / g.sigmas[i]
        x = ratio * x - g.alphas[i + 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        report_step(callback, i, g.ts[i], x, x0)
    return x


# ---- sigma-space (EDM / k-diffusion) samplers -------------------------------------------------------
def sample_euler(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                 prediction_type: str = "eps", generator: torch.Generator | None = None,
                 callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler on the probability-flow ODE dx̄/dσ = (x̄ − D(x̄; σ))/σ (Karras et al. 2022, eq. 3 and
    Algorithm 1 without its 2nd-order correction). With the exact x̂0 this equals DDIM with η = 0."""
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    s = g.ve_sigmas
    x = x / g.ve_alphas[0]
    for i in step_range(len(g), progress, "euler"):
        x0 = predict.sigma_space(x, g.ts[i], s[i], g.ve_alphas[i])
        d = (x - x0) / s[i]
        x = x + (s[i + 1] - s[i]) * d
        report_step(callback, i, g.ts[i], x * g.ve_alphas[i + 1], x0)
    return x


def sample_euler_ancestral(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                           prediction_type: str = "eps", generator: torch.Generator | None = None, eta: float = 1.0,
                           callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Euler-ancestral in σ-space: an Euler step to σ_down, then fresh noise σ_up, with
    σ_up = min(σ', η √(σ'²(σ² − σ'²)/σ²)), σ_down = √(σ'² − σ_up²) (k-diffusion's get_ancestral_step).
    For η = 1, σ_up² is DDPM's β̃ (eq. 7) in x/α units, so this is DDPM ancestral sampling (≡ DDIM η = 1)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    s = g.ve_sigmas
    x = x / g.ve_alphas[0]
    for i in step_range(len(g), progress, "euler-a"):
        x0 = predict.sigma_space(x, g.ts[i], s[i], g.ve_alphas[i])
        d = (x - x0) / s[i]
        s_up = min(s[i + 1], eta * math.sqrt(max(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2, 0.0)))
        s_down = math.sqrt(s[i + 1] ** 2 - s_up**2)
        x = x + (s_down - s[i]) * d
        if s_up > 0:
            x = x + s_up * standard_normal(x.shape, x, generator)
        report_step(callback, i, g.ts[i], x * g.ve_alphas[i + 1], x0)
    return x


def sample_heun(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                prediction_type: str = "eps", generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Heun's 2nd-order method on the PF-ODE in σ (Karras et al. 2022, Algorithm 1 with S_churn = 0):
    an Euler step, then the trapezoid correction with the slope at the new point; the last step
    (to σ = 0) is Euler. Uses 2N − 1 model evaluations for N timesteps."""
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    s = g.ve_sigmas
    x = x / g.ve_alphas[0]
    for i in step_range(len(g), progress, "heun"):
        x0 = predict.sigma_space(x, g.ts[i], s[i], g.ve_alphas[i])
        d = (x - x0) / s[i]
        x_euler = x + (s[i + 1] - s[i]) * d
        if s[i + 1] > 0:
            d_next = (x_euler - predict.sigma_space(x_euler, g.ts[i + 1], s[i + 1], g.ve_alphas[i + 1])) / s[i + 1]
            x = x + (s[i + 1] - s[i]) * 0.5 * (d + d_next)
        else:
            x = x_euler
        report_step(callback, i, g.ts[i], x * g.ve_alphas[i + 1], x0)
    return x


# ---- consistency-model sampling ---------------------------------------------------------------------
def sample_lcm(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
               prediction_type: str = "eps", generator: torch.Generator | None = None,
               boundary_condition: bool = True, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
               callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, Luo et al. 2023, Algorithm 3):
    x̂0 = f(x_{t_i}, t_i), then re-noise to the next timestep, x_{t_{i+1}} = α x̂0 + σ z; returns the last x̂0.
    f applies the boundary condition c_skip x + c_out x̂0 (objectives.consistency_scalings) unless
    ``boundary_condition=False``."""
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    for i in step_range(len(g), progress, "lcm"):
        x0, _ = predict(x, g.ts[i], g.alphas[i], g.sigmas[i])
        if boundary_condition:
            c_skip, c_out = consistency_scalings(g.ts[i], sigma_data, timestep_scaling)
            x0 = float(c_skip) * x + float(c_out) * x0
        if i < len(g) - 1:
            x = g.alphas[i + 1] * x0 + g.sigmas[i + 1] * standard_normal(x.shape, x, generator)
        else:
            x = x0
        report_step(callback, i, g.ts[i], x, x0)
    return x


# ---- score-based samplers (NCSN / SMLD), in sigma space -------------------------------------------------
def _score(predict: Predictor, x: Tensor, g: Grid, i: int) -> tuple[Tensor, Tensor]:
    """(∇ log p_σ̄(x̄), x̂0) at level i for the σ̄-space variable x̄ = x/α: Tweedie's formula
    ∇ log p_σ̄(x̄) = (D(x̄; σ̄) − x̄)/σ̄² (Efron 2011; Karras et al. 2022 eq. 3), i.e. −ε̂/σ̄."""
    x0 = predict.sigma_space(x, g.ts[i], g.ve_sigmas[i], g.ve_alphas[i])
    return (x0 - x) / g.ve_sigmas[i] ** 2, x0


def sample_langevin(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                    prediction_type: str = "eps", generator: torch.Generator | None = None, n_steps_each: int = 100,
                    step_scale: float = 0.2, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Annealed Langevin dynamics, Song & Ermon 2019 Algorithm 1, over the noise levels σ̄_1 > ... > σ̄_L of
    ``timesteps`` (``spacing="geometric"`` gives their geometric ladder, §4.2): at each level
    ``n_steps_each`` steps x̄ ← x̄ + (α_i/2) s_θ(x̄, σ̄_i) + √α_i z with α_i = ε σ̄_i²/σ̄_L², where
    ``step_scale`` = ε/σ̄_L² (α_i/σ̄_i² is the same at every level; the defaults, 100 steps and 0.2, are the
    paper's T = 100, ε = 2·10⁻⁵ at σ_L = 0.01). Works on x̄ = x/α, so
    a VP model is used through its σ̄ view. Ends with one denoising step x̂0 = D(x̄; σ̄_L) (Song et al. 2021b
    App. G; Jolicoeur-Martineau et al. 2021), so N·n_steps_each + 1 model evaluations."""
    if n_steps_each < 1 or not step_scale > 0:
        raise ValueError(f"langevin needs n_steps_each >= 1 and step_scale > 0, got {n_steps_each}, {step_scale}")
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    x = x / g.ve_alphas[0]
    x0 = x
    for i in step_range(len(g), progress, "langevin"):
        step = step_scale * g.ve_sigmas[i] ** 2
        for _ in range(n_steps_each):
            score, x0 = _score(predict, x, g, i)
            x = x + 0.5 * step * score + math.sqrt(step) * standard_normal(x.shape, x, generator)
        report_step(callback, i, g.ts[i], x * g.ve_alphas[i], x0)
    return _score(predict, x, g, len(g) - 1)[1]


def sample_pc(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
              prediction_type: str = "eps", generator: torch.Generator | None = None, snr: float = 0.16,
              corrector_steps: int = 1, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021b, Algorithm 2 for the VE SDE, as their code orders it:
    corrector, then predictor at each level). Corrector: ``corrector_steps`` Langevin steps
    x̄ ← x̄ + ε s + √(2ε) z with ε = 2 (r ‖z‖/‖s‖)² per sample, r = ``snr`` (Algorithm 4).
    Predictor: the reverse-diffusion step x̄_s = x̄_t + (σ̄_t² − σ̄_s²) s + √(σ̄_t² − σ̄_s²) z (App. E's
    discretization of the reverse VE SDE, their ReverseDiffusionPredictor); the last one, to σ̄ = 0, is the
    denoising step x̂0. In σ̄ space any
    schedule is its VE view, so this is exactly VE-PC for a VE schedule. N·(corrector_steps + 1) evaluations."""
    if corrector_steps < 0 or snr < 0:
        raise ValueError(f"pc needs corrector_steps >= 0 and snr >= 0, got {corrector_steps}, {snr}")
    g, predict = Grid.build(schedule, timesteps), Predictor(model_fn, prediction_type, x)
    s = g.ve_sigmas
    x = x / g.ve_alphas[0]
    for i in step_range(len(g), progress, "pc"):
        for _ in range(corrector_steps):
            score, _ = _score(predict, x, g, i)
            z = standard_normal(x.shape, x, generator)
            score_norm = score.flatten(1).norm(dim=1).mean().clamp(min=torch.finfo(x.dtype).tiny)
            ratio = z.flatten(1).norm(dim=1).mean() / score_norm
            eps = 2 * (snr * ratio) ** 2
            x = x + eps * score + (2 * eps).sqrt() * z
        score, x0 = _score(predict, x, g, i)
        if s[i + 1] > 0:
            jump = s[i] ** 2 - s[i + 1] ** 2
            x = x + jump * score + math.sqrt(jump) * standard_normal(x.shape, x, generator)
        else:
            x = x0
        report_step(callback, i, g.ts[i], x * g.ve_alphas[i + 1], x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler-a": sample_euler_ancestral,
    "heun": sample_heun,
    "lcm": sample_lcm,
    "langevin": sample_langevin,
    "pc": sample_pc,
}


def check_timesteps(timesteps: Tensor | list[float], schedule: NoiseSchedule) -> Tensor:
    """Validate explicit sampling timesteps: 1-D, strictly decreasing, within [0, T−1]."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
    T = schedule.num_train_timesteps
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()) or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts.tolist()}")
    if len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts.tolist()}")
    return ts


def sample(model_fn: ModelFn, x_T: Tensor, schedule: NoiseSchedule, steps: int | None,
           sampler: str = "dpmpp-2m", prediction_type: str | None = None,
           generator: torch.Generator | None = None, eta: float | None = None, spacing: str = "trailing",
           timesteps: Tensor | list[float] | None = None, callback: Callback | None = None,
           progress: bool = False, **options: Any) -> Tensor:
    """Draw samples by integrating from ``x_T`` to clean data with the named sampler.

    ``steps`` timesteps are chosen by ``spacing`` (see ``NoiseSchedule.timesteps``: trailing, leading,
    linspace, karras) unless ``timesteps`` gives them explicitly. ``prediction_type`` defaults to the
    schedule's. ``eta`` goes to ddim (default 0) and euler-a (default 1); other keyword ``options`` go to
    the sampler (e.g. ``variance`` for ddpm). Runs under ``torch.no_grad()``; returns the same
    dtype/device as ``x_T``. ``callback`` receives ``{"i", "t", "x", "x0"}`` after every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {list(SAMPLERS)}")
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 1 or x_T.shape[0] == 0:
        raise ValueError("x_T must be a non-empty floating-point tensor of shape (B, ...)")
    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)
    if timesteps is None:
        if steps is None:
            raise ValueError("give steps (number of sampling steps) or explicit timesteps")
        ts = schedule.timesteps(steps, spacing)
    else:
        ts = check_timesteps(timesteps, schedule)
        if steps is not None and steps != len(ts):
            raise ValueError(f"steps={steps} but {len(ts)} explicit timesteps were given; pass steps=None")
    fn = SAMPLERS[sampler]
    kwargs = dict(options)
    if eta is not None:
        kwargs["eta"] = eta
    accepted = set(inspect.signature(fn).parameters) - {"model_fn", "x", "schedule", "timesteps"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"sampler {sampler!r} does not take {unknown}; it accepts {sorted(accepted)}")
    if kind == "eps" and float(schedule.alpha_sigma(ts[:1])[0]) == 0.0:
        raise ValueError("an eps-prediction model cannot recover x0 at zero SNR (ᾱ = 0 at the first timestep); "
                         "train with prediction_type 'v' (Lin et al. 2024) or start below T−1")
    with torch.no_grad():
        return fn(model_fn, x_T, schedule, ts, prediction_type=kind, generator=generator,
                  callback=callback, progress=progress, **kwargs)
