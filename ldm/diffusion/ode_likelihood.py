"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021b, §4.3 and App. D.2, eq. 39-40).

The PF-ODE dx/dτ = f̃(x, τ) = f(x, τ) − ½ g(τ)² ∇ log p_τ(x) (eq. 13, with the model's score) is a
continuous normalizing flow, so by the instantaneous change of variables (Chen et al. 2018)

    log p_{τ_min}(x(τ_min)) = log p_T(x(T)) + ∫_{τ_min}^{T} ∇·f̃(x(τ), τ) dτ            (eq. 39)

where x(τ) solves the ODE forward from the data and p_T is the prior N(0, prior_std² I). The divergence is
estimated with Hutchinson's trace estimator ∇·f̃ = E_v[vᵀ (∂f̃/∂x) v] for probes with E[v vᵀ] = I (eq. 40;
Hutchinson 1989; Grathwohl et al. 2019): Rademacher or Gaussian v, drawn once per solve (so an adaptive
solver sees one smooth ODE) and vectorised: K probes are K copies of the batch in one forward and one
vector-Jacobian product. For low-dimensional data ``exact=True`` takes the trace from D backward passes.

For 8-bit data the density is turned into a bound on the discrete likelihood by uniform dequantization
(Theis et al. 2016; Ho et al. 2019): −log P(x) ≤ E_u[−log p(x + u)] − D log Δ, u ~ U(−Δ/2, Δ/2)^D, with
bin width Δ = 2/255 for data in [−1, 1] (:func:`ode_bits_per_dim`). The density evaluated is that of the
schedule's level τ_min = 0, i.e. the data convolved with N(0, σ̄_0²) (σ̄_0 = 0.006-0.03 for the usual
schedules), the same "ε > 0" cut-off Song et al. use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.likelihood import LN2
from ldm.diffusion.objectives import normalize_prediction_type, standard_normal
from ldm.diffusion.ode import integrate
from ldm.diffusion.samplers import ModelFn, Predictor
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.sde import sde_for

PROBES = ("rademacher", "gaussian")
Field = Callable[[Tensor], Tensor]


def draw_probes(count: int, like: Tensor, kind: str = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """``count`` probe vectors per sample, shaped (count, *like.shape), with E[v vᵀ] = I: Rademacher (±1) or
    standard Gaussian."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}: use one of {list(PROBES)}")
    if count < 1:
        raise ValueError(f"need at least one probe, got {count}")
    z = standard_normal((count, *like.shape), like, generator)
    return z.sign() if kind == "rademacher" else z


def hutchinson_divergence(fn: Field, x: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(x), div)`` with div (B,) the Hutchinson estimate mean_k v_kᵀ J v_k of ∇·fn at each sample (eq. 40),
    from the (K, B, ...) ``probes``: one forward of the K·B batch and one vector-Jacobian product."""
    k, b = probes.shape[0], x.shape[0]
    with torch.enable_grad():
        xk = x.detach().repeat(k, *([1] * (x.ndim - 1))).requires_grad_(True)
        out = fn(xk)
        v = probes.reshape(k * b, *x.shape[1:]).to(out.dtype)
        (vjp,) = torch.autograd.grad(out, xk, grad_outputs=v)
    div = (vjp * v).flatten(1).sum(1).view(k, b).mean(0)
    return out.detach()[:b], div.detach()


def exact_divergence(fn: Field, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(x), tr ∂fn/∂x)`` per sample by D vector-Jacobian products (for low-dimensional x, e.g. the 2-D toy)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg)
        flat = out.flatten(1)
        div = torch.zeros(x.shape[0], dtype=out.dtype, device=x.device)
        for d in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, d].sum(), xg, retain_graph=d < flat.shape[1] - 1)
            div = div + grad.flatten(1)[:, d]
    return out.detach(), div.detach()


def probability_flow_field(model_fn: ModelFn, schedule: NoiseSchedule, prediction_type: str | None = None,
                           like: Tensor | None = None) -> Callable[[Tensor, float], Tensor]:
    """f̃(x, τ) = f − ½ g² ∇ log p_τ (eq. 13) of the schedule's SDE (``sde.sde_for``), differentiable in x."""
    sde = sde_for(schedule)
    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)
    ref = like if like is not None else torch.zeros(1)

    def field(x: Tensor, tau: float) -> Tensor:
        predict = Predictor(model_fn, kind, ref)
        return sde.reverse_drift(predict, x, tau, probability_flow=True)

    return field


@dataclass
class ODELikelihood:
    """Per-sample log p_{τ_min}(x) = ``prior_logp`` + ``delta`` (nats), the latent ``x_T`` and the solver's ``nfe``."""

    log_p: Tensor
    prior_logp: Tensor
    delta: Tensor
    x_T: Tensor
    nfe: int


def prior_log_prob(x_T: Tensor, prior_std: float) -> Tensor:
    """log N(x_T; 0, prior_std² I) summed over the non-batch dims."""
    d = x_T[0].numel()
    return -0.5 * (d * math.log(2 * math.pi * prior_std**2) + x_T.flatten(1).pow(2).sum(1) / prior_std**2)


@torch.no_grad()
def ode_log_likelihood(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, *, prediction_type: str | None = None,
                       method: str = "rk4", steps: int = 50, rtol: float = 1e-5, atol: float = 1e-5,
                       probes: int = 1, probe: str = "rademacher", exact: bool = False, t_min: float = 0.0,
                       generator: torch.Generator | None = None) -> ODELikelihood:
    """log p_{τ_min}(x) of the PF-ODE flow (eq. 39) for continuous data ``x`` (B, ...): the augmented ODE
    d(x, Δ)/dτ = (f̃, ∇·f̃) is solved from τ_min to T−1 with ``method`` (fixed-step "euler", "heun", "rk4" over
    ``steps`` steps, or adaptive "dopri5" with ``rtol``/``atol``; ``ldm.diffusion.ode``), then
    log p = log p_T(x(T)) + Δ. ``probes`` Hutchinson probes of kind ``probe`` (or ``exact`` traces)."""
    field = probability_flow_field(model_fn, schedule, prediction_type, x)
    v = None if exact else draw_probes(probes, x, probe, generator)

    def augmented(tau: float, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        fn = lambda y: field(y, tau)  # noqa: E731 - the field at this time
        dx, div = exact_divergence(fn, state[0]) if v is None else hutchinson_divergence(fn, state[0], v)
        return dx, div.to(state[1].dtype)

    t_max = float(schedule.num_train_timesteps - 1)
    start = (x, torch.zeros(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                            device=x.device))
    (x_T, delta), nfe = integrate(augmented, start, float(t_min), t_max, method, steps, rtol, atol)
    prior = prior_log_prob(x_T, schedule.prior_std).to(delta.dtype)
    return ODELikelihood(prior + delta, prior, delta, x_T, nfe)


def dequantize(x: Tensor, bins: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """x + u with u ~ U(−δ, δ), δ = 1/(bins − 1): uniform noise over each 8-bit bin of data in [−1, 1]."""
    u = torch.rand(x.shape, generator=generator, device=generator.device if generator is not None else x.device,
                   dtype=torch.float32).to(x.device, x.dtype)
    return x + (2 * u - 1) / (bins - 1)


def ode_bits_per_dim(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, *, bins: int | None = 256,
                     generator: torch.Generator | None = None, **options) -> tuple[Tensor, ODELikelihood]:
    """Per-sample bits/dim of the PF-ODE model: −(log p(x + u) + D log Δ)/(D ln 2) with uniform dequantization
    for ``bins``-level data in [−1, 1] (Δ = 2/(bins − 1)); ``bins=None``: continuous data, −log p(x)/(D ln 2).
    ``options`` go to :func:`ode_log_likelihood`."""
    d = x[0].numel()
    if bins is None:
        result = ode_log_likelihood(model_fn, x, schedule, generator=generator, **options)
        return -result.log_p / (d * LN2), result
    result = ode_log_likelihood(model_fn, dequantize(x, bins, generator), schedule, generator=generator, **options)
    return -(result.log_p + d * math.log(2 / (bins - 1))) / (d * LN2), result
