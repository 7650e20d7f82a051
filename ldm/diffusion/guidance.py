"""Guidance as wrappers of the ``model_fn(x, t)`` every sampler takes: classifier-free guidance (Ho & Salimans
2022), which turns a conditional denoiser ``denoiser(x, t, cond)`` into a ``model_fn``, and classifier guidance
(Dhariwal & Nichol 2021), which wraps any ``model_fn`` (CFG's included: the two combine).

Both follow the lectures' Bayes rule on scores, ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t), with the
score of a VP model s(x_t) = −ε̂/σ_t (DDPM/score matching, Dhariwal & Nichol 2021 eq. 11).

Guidance is applied to the model's raw output, whatever its prediction type. That is exact: for a
fixed x_t the maps output → x̂0, ε̂, v̂ are affine with the same x_t term in both branches
(objectives.predict_x0_eps), so ``u + w (c − u)`` in eps, v or x0 gives the same guided x̂0 and ε̂
(Ho & Salimans 2022 eq. 6 is written for ε). The guidance rescale is not linear, so it depends on the
space it acts in: like Lin et al. 2024 (§3.4, who use v-prediction) it acts on the model output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.conditioning import GUIDANCE_SCALE, Conditioning
from ldm.diffusion.objectives import normalize_prediction_type, predict_x0_eps, training_target
from ldm.diffusion.schedules import DiscreteSchedule, NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]
ModelFn = Callable[[Tensor, Tensor], Tensor]
LogLikelihood = Callable[[Tensor, Tensor], Tensor]


def guided_output(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """``u + w (c − u)`` (Ho & Salimans 2022, eq. 6 with w = 1 + their w), then with φ = ``rescale`` the
    guidance rescale of Lin et al. 2024, eq. 15-16: x_rescaled = x_cfg · std(x_pos)/std(x_cfg),
    x = φ x_rescaled + (1 − φ) x_cfg, stds taken per sample over all non-batch dims."""
    guided = uncond + scale * (cond - uncond)
    if rescale:
        dims = list(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True).clamp(min=torch.finfo(guided.dtype).tiny)
        guided = rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided
    return guided


def classifier_free_guidance(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning, scale: float,
                             rescale: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``denoiser`` so each ``model_fn(x, t)`` call evaluates cond and uncond in ONE batched forward
    of size 2B and returns :func:`guided_output`. ``scale`` = 1 gives the conditional model, 0 the
    unconditional one.

    A denoiser with a learned variance (2C output channels, ``ldm.diffusion.variance``) is guided on its mean
    part; the variance channels are the conditional branch's (as GLIDE does).

    ``cond``/``uncond`` hold B or 1 rows (a batch of 1 is broadcast); they are padded to a common token
    length once per batch size (exact: padded keys are masked out), on the device of ``x``.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale φ must be in [0, 1], got {rescale}")
    if cond.tokens.shape[2:] != uncond.tokens.shape[2:]:
        raise ValueError(f"cond tokens {tuple(cond.tokens.shape)} and uncond tokens {tuple(uncond.tokens.shape)} "
                         "must share their width D")
    batched: dict[tuple[int, torch.device], Conditioning] = {}

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        b, key = x.shape[0], (x.shape[0], x.device)
        if key not in batched:  # built once per batch size: the sampler loop only runs the denoiser
            batched[key] = Conditioning.cat([uncond.expand(b), cond.expand(b)]).to(x.device)
        out_uncond, out_cond = denoiser(torch.cat([x, x]), torch.cat([t, t]), batched[key]).chunk(2)
        c = x.shape[1]
        if x.ndim > 1 and out_cond.shape[1] == 2 * c:  # mean + learned variance: guide the mean, keep cond's v
            mean = guided_output(out_uncond[:, :c], out_cond[:, :c], scale, rescale)
            return torch.cat([mean, out_cond[:, c:]], 1)
        return guided_output(out_uncond, out_cond, scale, rescale)

    return model_fn


def conditional_model(denoiser: Denoiser, cond: Conditioning) -> Callable[[Tensor, Tensor], Tensor]:
    """``model_fn(x, t) = denoiser(x, t, cond)``: no guidance, one forward of size B."""
    moved: dict[torch.device, Conditioning] = {}

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if x.device not in moved:
            moved[x.device] = cond.expand(x.shape[0]).to(x.device)
        return denoiser(x, t, moved[x.device])

    return model_fn


def takes_guidance_scale(denoiser: Denoiser) -> bool:
    """Whether ``denoiser`` is w-conditioned: it reads the CFG scale from ``cond.extras["guidance_scale"]``
    (its config sets ``guidance_embed_dim``; a guidance-distilled student, Meng et al. 2023 / LCM)."""
    return bool(getattr(getattr(denoiser, "config", None), "guidance_embed_dim", None))


def with_guidance_scale(cond: Conditioning, scale: float | Tensor) -> Conditioning:
    """``cond`` with ``extras["guidance_scale"]`` set to ``scale`` (a number for every row, or a (B,) tensor)."""
    value = torch.as_tensor(scale, dtype=torch.float32, device=cond.tokens.device).reshape(-1)
    value = value.expand(cond.batch_size) if value.numel() == 1 else value
    return Conditioning(cond.tokens, cond.mask, cond.pooled, {**cond.extras, GUIDANCE_SCALE: value})


def guided_model(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning, scale: float,
                 rescale: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampler's ``model_fn``: :func:`classifier_free_guidance`, or :func:`conditional_model` when the
    guided output equals the conditional one (scale 1, no rescale: half the compute, the same images up to
    rounding) or when the denoiser takes the scale as an input (:func:`takes_guidance_scale`: one forward,
    ``rescale`` does not apply). The one place that decides whether a CFG batch is needed."""
    if takes_guidance_scale(denoiser):
        return conditional_model(denoiser, with_guidance_scale(cond, scale))
    if scale == 1.0 and rescale == 0.0:
        return conditional_model(denoiser, cond)
    return classifier_free_guidance(denoiser, cond, uncond, scale, rescale)


def shift_eps(output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, delta_eps: Tensor, prediction_type: str
              ) -> Tensor:
    """The model ``output`` whose implied ε̂ is moved by ``delta_eps`` at fixed x_t, re-expressed in the model's own
    prediction type: ε̂' = ε̂ + Δ, x̂0' = (x_t − σ ε̂')/α = x̂0 − (σ/α) Δ (DDPM eq. 4 solved for x0, see
    ``objectives.predict_x0_eps``), then eps → ε̂', x0 → x̂0', v → α ε̂' − σ x̂0' (Salimans & Ho 2022, App. D).
    Where α = 0 (zero terminal SNR) x̂0 does not depend on ε̂: the output is returned unchanged there."""
    kind = normalize_prediction_type(prediction_type)
    x0, eps = predict_x0_eps(output, x, alpha, sigma, kind)
    safe = alpha.clamp(min=torch.finfo(alpha.dtype).tiny)
    shifted = training_target(x0 - (sigma / safe) * delta_eps, eps + delta_eps, alpha, sigma, kind)
    return torch.where(alpha > 0, shifted, output)


def classifier_guidance(model_fn: ModelFn, log_likelihood: LogLikelihood, scale: float, schedule: DiscreteSchedule,
                        prediction_type: str | None = None) -> ModelFn:
    """Classifier guidance in the prediction-type-agnostic form: every call computes g = ∇_{x_t} log p(y | x_t)
    (``log_likelihood(x_t, t)`` returns (B,) log-probabilities; it is differentiated per sample) and shifts

        ε̂' = ε̂ − s · σ_t · g                     (Dhariwal & Nichol 2021, §4.2, eq. 14 and Algorithm 2)

    i.e. the score −ε̂/σ_t gains s·∇ log p(y | x_t), the Bayes rule of the lectures with the classifier term scaled
    by s. The wrapped ``model_fn`` may already be classifier-free guided (CFG + classifier guidance). The shifted
    ε̂ is re-expressed as the model's own output type (:func:`shift_eps`), so every sampler, whatever the
    prediction type, takes the same step it would take from the guided ε̂. For one ancestral DDPM step the mean
    μ = (x_t − β_t ε̂/σ_t)/√α_t (DDPM eq. 11) moves by s·β_t·g/√α_t: Algorithm 1's s·Σ·g with Σ = β_t, up to the
    factor 1/√α_t ≈ 1. ``scale`` 0 returns ``model_fn`` itself (no gradient computed)."""
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")
    if scale == 0:
        return model_fn
    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = log_likelihood(x_in, t)
            (grad,) = torch.autograd.grad(log_p.sum(), x_in)
        alpha, sigma = schedule.alpha_sigma(t, like=x)
        return shift_eps(out, x, alpha, sigma, -scale * sigma * grad.to(x.dtype), kind)

    return guided


def clip_denoised(model_fn: ModelFn, schedule: NoiseSchedule, prediction_type: str, bound: float = 1.0) -> ModelFn:
    """``model_fn`` with its x̂0 clipped to [−bound, bound]: the sampler of Ho et al. 2020 for images in [−1, 1]
    and improved-diffusion's ``clip_denoised`` (Saharia et al. 2022, §2.3, "static thresholding"). The output is
    turned into x̂0, clipped, and expressed back in the model's prediction type (exact: the conversions are
    affine), so every sampler uses the clipped x̂0 and the ε̂ consistent with it; the channels of a learned
    variance pass through. For pixel-space models: near t = T−1 of a cosine schedule ᾱ ≈ 0 and an ε-model's
    x̂0 = (x − σ ε̂)/α is unbounded."""
    kind = normalize_prediction_type(prediction_type)

    def model(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(x, t)
        c = x.shape[1]
        mean, rest = (out[:, :c], out[:, c:]) if x.ndim > 1 and out.shape[1] == 2 * c else (out, None)
        alpha, sigma = schedule.alpha_sigma(t, like=x)
        x0 = predict_x0_eps(mean, x, alpha, sigma, kind)[0].clamp(-bound, bound)
        clipped = training_target(x0, (x - alpha * x0) / sigma, alpha, sigma, kind)
        return clipped if rest is None else torch.cat([clipped, rest], 1)

    return model
