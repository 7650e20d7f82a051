"""The variational bound on −log p_θ(x_0) in bits/dim, term by term (DDPM eq. 5; iDDPM §3.3).

For a T-level schedule (indices t = 0..T−1; level "clean" is the data x), the bound is

    L_vlb = L_prior + Σ_{t=1}^{T−1} L_t + L_0,
    L_prior = KL(q(x_{T−1} | x) ‖ N(0, prior_std² I)),
    L_t     = KL(q(x_{t−1} | x_t, x) ‖ p_θ(x_{t−1} | x_t)),            x_t ~ q(x_t | x),
    L_0     = −log p_θ(x | x_0),                                         x_0 ~ q(x_0 | x),

(DDPM eq. 5 with our 0-based t: their L_T, L_{t−1} and L_0). p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_θ) with μ_θ the
posterior mean at the model's x̂0 (eq. 7) and Σ_θ fixed or learned (``ldm.diffusion.variance``). For 8-bit
data in [−1, 1] the decoder L_0 is the discretized Gaussian of DDPM eq. 13 (bins of width 2/255, open-ended
at ±1), which makes the bound a bound on the *discrete* data's −log P, comparable to the papers' bits/dim;
for continuous data (latents) it is the Gaussian density. All terms are in nats summed over dimensions;
:meth:`VLB.bits_per_dim` divides by D·ln 2.

The T−1 KL terms are summed exactly (``timesteps=None``: T−1 model evaluations per sample) or estimated
without bias from K of them: stratified uniform sampling (one t per equal stratum, weighted by its size) or
importance sampling from a proposal π(t) with weights 1/(K π(t)) (iDDPM §3.3 uses π ∝ √E[L_t²]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.objectives import normalize_prediction_type, predict_x0_eps, standard_normal
from ldm.diffusion.samplers import ModelFn
from ldm.diffusion.schedules import NoiseSchedule, gaussian_posterior
from ldm.diffusion.variance import learned_log_variance, split_output

LN2 = math.log(2.0)
DECODERS = ("discretized", "gaussian")


# ---- elementwise densities ---------------------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor | float, mean2: Tensor, logvar2: Tensor | float) -> Tensor:
    """KL(N(mean1, e^{logvar1}) ‖ N(mean2, e^{logvar2})) per element, in nats:
    ½ (logvar2 − logvar1 + e^{logvar1 − logvar2} + (mean1 − mean2)² e^{−logvar2} − 1)."""
    logvar1, logvar2 = torch.as_tensor(logvar1, dtype=mean1.dtype), torch.as_tensor(logvar2, dtype=mean1.dtype)
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2) - 1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor | float) -> Tensor:
    """log N(x; mean, e^{logvar}) per element (nats)."""
    logvar = torch.as_tensor(logvar, dtype=x.dtype)
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def _log_diff_ndtr(upper: Tensor, lower: Tensor) -> Tensor:
    """log(Φ(upper) − Φ(lower)) for upper > lower, stable in both tails (by symmetry Φ(b) − Φ(a) = Φ(−a) − Φ(−b))."""
    flip = lower > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp(max=0.0)).clamp(max=1 - 1e-15))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor | float, bins: int = 256) -> Tensor:
    """log P(x) per element for data on ``bins`` levels in [−1, 1] under the discretized Gaussian of DDPM eq. 13:
    the N(mean, e^{logvar}) mass of [x − δ, x + δ] with δ = 1/(bins − 1), the first bin extended to −∞ and the
    last to +∞. Computed in float64 with log Φ, so tails do not underflow."""
    dtype = x.dtype
    x, mean = x.double(), mean.double()
    inv_std = torch.exp(-0.5 * torch.as_tensor(logvar, dtype=torch.float64))
    delta = 1.0 / (bins - 1)
    upper = torch.where(x > 1 - delta, torch.full_like(x, math.inf), (x + delta - mean) * inv_std)
    lower = torch.where(x < -1 + delta, torch.full_like(x, -math.inf), (x - delta - mean) * inv_std)
    out = torch.where(torch.isinf(upper), torch.special.log_ndtr(-lower),
                      torch.where(torch.isinf(lower), torch.special.log_ndtr(upper), _log_diff_ndtr(upper, lower)))
    return out.to(dtype)


def quantize(x: Tensor, bins: int = 256) -> Tensor:
    """Round data in [−1, 1] to the nearest of ``bins`` levels (what 8-bit images are)."""
    return ((x.clamp(-1, 1) + 1) * (bins - 1) / 2).round() * 2 / (bins - 1) - 1


# ---- the bound -------------------------------------------------------------------------------------------
@dataclass
class VLB:
    """Per-sample terms of the bound, in nats summed over the ``dims`` data dimensions.

    ``kl`` is the estimate of Σ_{t=1}^{T−1} L_t; ``kl_terms`` (B, K) the evaluated L_t at ``kl_timesteps``
    (K,) with ``kl_weights`` (B, K) such that kl = Σ_k w L_{t_k} (weights 1 when exhaustive)."""

    prior: Tensor
    kl: Tensor
    decoder: Tensor
    dims: int
    kl_timesteps: Tensor
    kl_terms: Tensor
    kl_weights: Tensor

    @property
    def total(self) -> Tensor:
        """L_prior + Σ L_t + L_0 per sample (nats)."""
        return self.prior + self.kl + self.decoder

    def bits_per_dim(self) -> Tensor:
        """The bound per sample in bits per dimension."""
        return self.total / (self.dims * LN2)


def _step_variances(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(β̃, β) of the integer step t → t − 1 (float64)."""
    a_t, s_t = (float(v) for v in schedule.alpha_sigma(torch.tensor(t)))
    a_s, s_s = (float(v) for v in schedule.alpha_sigma(torch.tensor(t - 1)))
    _, _, small, large = gaussian_posterior(a_t, s_t, a_s, s_s)
    return small, large


def vlb_term(output: Tensor, x: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, *,
             prediction_type: str | None = None, variance: str | None = None, decoder: str = "discretized",
             bins: int = 256) -> Tensor:
    """One term of L_vlb per sample (nats summed over dims) from the model ``output`` at x_t, timesteps ``t`` (B,):
    L_t = KL(q(x_{t−1} | x_t, x) ‖ p_θ(x_{t−1} | x_t)) for t ≥ 1, the decoder −log p_θ(x | x_0) for t = 0.

    μ_θ = c0 x̂0 + ct x_t (the posterior mean at the model's x̂0, DDPM eq. 7 / ``gaussian_posterior``);
    Σ_θ: ``variance`` fixed_small (β̃, clipped to β̃ of step 1 at t = 0, as iDDPM), fixed_large (β; at t = 0
    σ_0², DDPM's decoder variance σ_1² = β_1) or learned (eq. 15 between those ends; the default for 2C outputs).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: use one of {list(DECODERS)}")
    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)
    mean_out, raw = split_output(output.to(x_t.dtype), x_t.shape[1])
    alpha_t, sigma_t = schedule.alpha_sigma(t, like=x_t)
    x0_hat = predict_x0_eps(mean_out, x_t, alpha_t, sigma_t, kind)[0]
    alpha_s, sigma_s = schedule.alpha_sigma((t - 1).clamp(min=0), like=x_t)
    data = (t == 0).view(alpha_s.shape)
    alpha_s = torch.where(data, torch.ones_like(alpha_s), alpha_s)
    sigma_s = torch.where(data, torch.zeros_like(sigma_s), sigma_s)
    c0, ct, var_small, var_large = gaussian_posterior(alpha_t, sigma_t, alpha_s, sigma_s)
    small_1 = torch.full_like(var_small, _step_variances(schedule, 1)[0])
    log_small = torch.where(data, small_1, var_small).log()
    log_large = var_large.log()
    choice = variance or ("learned" if raw is not None else "fixed_small")
    if choice == "learned":
        if raw is None:
            raise ValueError("variance 'learned' needs a model with 2C output channels (mean and v)")
        model_logvar = learned_log_variance(raw, log_small, log_large)
    elif choice == "fixed_small":
        model_logvar = log_small.expand_as(x_t)
    elif choice == "fixed_large":
        model_logvar = log_large.expand_as(x_t)
    else:
        raise ValueError(f"unknown variance {choice!r}: use fixed_small, fixed_large or learned")
    model_mean = c0 * x0_hat + ct * x_t
    dims = tuple(range(1, x.ndim))
    out = torch.zeros(x.shape[0], dtype=torch.promote_types(x_t.dtype, torch.float32), device=x.device)
    is_data = data.flatten()
    if not bool(is_data.all()):  # KL terms (t ≥ 1)
        kl = normal_kl(c0 * x + ct * x_t, log_small, model_mean, model_logvar).sum(dims)
        out = torch.where(is_data, out, kl.to(out.dtype))
    if bool(is_data.any()):  # decoder terms (t = 0)
        if decoder == "discretized":
            nll = -discretized_gaussian_log_likelihood(x, model_mean, model_logvar, bins).sum(dims)
        else:
            nll = -gaussian_log_likelihood(x, model_mean, model_logvar).sum(dims)
        out = torch.where(is_data, nll.to(out.dtype), out)
    return out


def hybrid_loss(output: Tensor, x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule, *,
                prediction_type: str | None = None, lam: float = 0.001, decoder: str = "discretized",
                weighting: str = "uniform", gamma: float = 5.0) -> Tensor:
    """L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021, eq. 16, λ = 0.001) for a 2C-output model.

    L_simple is the (weighted) MSE of the mean part (``objectives.diffusion_loss``); L_vlb is estimated by
    T · L_t at the batch's t (uniform t: E_t[T L_t] = Σ L_t), L_t from :func:`vlb_term` per dimension, with a
    stop-gradient on the mean part so L_vlb only trains Σ_θ (§3.1: "we apply a stop-gradient to the μ_θ(x_t, t)
    output for the L_vlb term"). The reference code measures this term in bits and scales it by T/1000, the same
    λ T; here it is in nats, as the paper's L_vlb."""
    from ldm.diffusion.objectives import diffusion_loss

    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)
    mean_out, raw = split_output(output, x0.shape[1])
    if raw is None:
        raise ValueError("the hybrid loss needs a model with 2C output channels (mean and learned variance v)")
    simple = diffusion_loss(mean_out, x0, noise, t, schedule, kind, weighting, gamma)
    x_t = schedule.q_sample(x0, t, noise)
    frozen = torch.cat([mean_out.detach(), raw], 1)
    dtype = torch.promote_types(output.dtype, torch.float32)
    vb = vlb_term(frozen.to(dtype), x0.to(dtype), x_t.to(dtype), t, schedule, prediction_type=kind,
                  variance="learned", decoder=decoder) / x0[0].numel()
    return simple + lam * schedule.num_train_timesteps * vb.mean()


def kl_timesteps_for(batch: int, T: int, timesteps: int | None, proposal: Tensor | None,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Which L_t (t ∈ 1..T−1) to evaluate per sample and their weights: all (weights 1), K stratified-uniform
    ones (weight = stratum size) or K draws from ``proposal`` (weights 1/(K π(t)))."""
    n = T - 1
    if timesteps is None or timesteps >= n and proposal is None:
        return torch.arange(1, T).expand(batch, n), torch.ones(batch, n, dtype=torch.float64)
    k = int(timesteps)
    if k < 1:
        raise ValueError(f"timesteps must be >= 1 (or None for all T−1 terms), got {timesteps}")
    if proposal is not None:
        pi = torch.as_tensor(proposal, dtype=torch.float64).flatten()
        if pi.numel() != n or bool((pi < 0).any()) or float(pi.sum()) <= 0:
            raise ValueError(f"proposal must hold {n} non-negative weights (for t = 1..{n}), got {tuple(pi.shape)}")
        pi = pi / pi.sum()
        idx = torch.multinomial(pi.float().expand(batch, n), k, replacement=True, generator=generator)
        return idx + 1, 1.0 / (k * pi[idx])
    edges = torch.linspace(0, n, k + 1, dtype=torch.float64).round().long()
    sizes = (edges[1:] - edges[:-1]).clamp(min=1)
    u = torch.rand(batch, k, generator=generator, dtype=torch.float64)
    idx = edges[:-1] + (u * sizes).long().clamp(max=sizes - 1)
    return idx + 1, sizes.to(torch.float64).expand(batch, k).clone()


@torch.no_grad()
def variational_bound(model_fn: ModelFn, x: Tensor, schedule: NoiseSchedule, *, prediction_type: str | None = None,
                      variance: str | None = None, decoder: str = "discretized", bins: int = 256,
                      timesteps: int | None = None, proposal: Tensor | None = None,
                      generator: torch.Generator | None = None, chunk: int = 1) -> VLB:
    """The terms of L_vlb (module doc) for data ``x`` (B, ...): 8-bit data in [−1, 1] with the "discretized"
    decoder, any real data with "gaussian". ``variance``: None = learned for a 2C-output model else
    fixed_small. ``timesteps``: None sums all T−1 KL terms, K estimates them (``proposal``: importance
    weights over t = 1..T−1, else stratified uniform). ``chunk`` timesteps share one model call (batch B·chunk).
    Fresh noise x_t ~ q(x_t | x) per term, from ``generator``."""
    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)
    options = dict(prediction_type=kind, variance=variance, decoder=decoder, bins=bins)
    T, B = schedule.num_train_timesteps, x.shape[0]
    sum_dims = tuple(range(1, x.ndim))
    a_T, s_T = schedule.alpha_sigma(torch.full((B,), T - 1), like=x)
    prior = normal_kl(a_T * x, 2 * s_T.log(), torch.zeros_like(x), 2 * math.log(schedule.prior_std)).sum(sum_dims)

    def term(tt: Tensor, xx: Tensor) -> Tensor:
        x_t = schedule.q_sample(xx, tt, standard_normal(xx.shape, xx, generator))
        return vlb_term(model_fn(x_t, tt.to(x_t.dtype)), xx, x_t, tt, schedule, **options)

    decoder_nll = term(torch.zeros(B, dtype=torch.long, device=x.device), x)
    ts, weights = kl_timesteps_for(B, T, timesteps, proposal, generator)
    terms = torch.empty(ts.shape, dtype=torch.float64)
    for start in range(0, ts.shape[1], chunk):
        cols = ts[:, start:start + chunk]
        c = cols.shape[1]
        tt = cols.T.reshape(-1).to(x.device)  # column-major: all samples at t_k, then at t_{k+1}, ...
        terms[:, start:start + c] = term(tt, x.repeat(c, *([1] * (x.ndim - 1)))).double().view(c, B).T.cpu()
    kl = (terms * weights).sum(1)
    return VLB(prior.double().cpu(), kl, decoder_nll.double().cpu(), x[0].numel(), ts, terms, weights)


def mean_and_standard_error(values: Tensor) -> tuple[float, float]:
    """Mean of per-sample values and its standard error s/√n (0 for a single value)."""
    v = values.double().flatten()
    n = v.numel()
    return float(v.mean()), (float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0)
