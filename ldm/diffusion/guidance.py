"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional denoiser
``denoiser(x, t, cond)`` into the ``model_fn(x, t)`` every sampler takes.

Guidance is applied to the model's raw output, whatever its prediction type. That is exact: for a
fixed x_t the maps output → x̂0, ε̂, v̂ are affine with the same x_t term in both branches
(objectives.predict_x0_eps), so ``u + w (c − u)`` in eps, v or x0 gives the same guided x̂0 and ε̂
(Ho & Salimans 2022 eq. 6 is written for ε). The guidance rescale is not linear, so it depends on the
space it acts in: like Lin et al. 2024 (§3.4, who use v-prediction) it acts on the model output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.conditioning import Conditioning

Denoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]


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


def guided_model(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning, scale: float,
                 rescale: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """The sampler's ``model_fn``: :func:`classifier_free_guidance`, or :func:`conditional_model` when the
    guided output equals the conditional one (scale 1, no rescale: half the compute, the same images up to
    rounding). The one place that decides whether a CFG batch is needed."""
    if scale == 1.0 and rescale == 0.0:
        return conditional_model(denoiser, cond)
    return classifier_free_guidance(denoiser, cond, uncond, scale, rescale)
