"""The reverse-process variance Σ_θ(x_t, t) of p_θ(x_s | x_t) = N(μ_θ, Σ_θ): fixed or learned.

DDPM (Ho et al. 2020, §3.2) fixes Σ = σ_t² I to β̃_t (the posterior variance, "fixed_small") or β_t
("fixed_large"). Improved DDPM (Nichol & Dhariwal 2021, §3.1, eq. 15) learns it as an interpolation in
the log domain between the two,

    Σ_θ(x_t, t) = exp(v log β_t + (1 − v) log β̃_t),

with one v per output dimension. The denoiser then outputs 2C channels: C of the mean part (ε, v-pred
or x0, as usual) and C of v. The network's raw output r is mapped to v = (r + 1)/2, so r ∈ [−1, 1] spans
[β̃, β] (improved-diffusion's ``frac``); as in the paper nothing constrains r to that range.

For a strided step s < t (sampling with fewer steps, iDDPM §4) both ends are the respaced
β_{t|s} = 1 − ᾱ_t/ᾱ_s and β̃_{t|s} (``schedules.gaussian_posterior``) and the same v is used. At the
step to clean data β̃ = 0; its log is clipped to the next step's β̃ (improved-diffusion's
``posterior_log_variance_clipped``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned")


def split_output(output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """``(mean part, raw v or None)`` of a denoiser output with C or 2C channels (dim 1) for C-channel x."""
    if output.ndim < 2 or output.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"model output {tuple(output.shape)} has neither {channels} channels (mean) nor "
                         f"{2 * channels} (mean and learned variance) for {channels}-channel inputs")
    if output.shape[1] == channels:
        return output, None
    return output[:, :channels], output[:, channels:]


def interpolate_log_variance(frac: Tensor | float, log_small: Tensor | float,
                             log_large: Tensor | float) -> Tensor | float:
    """log Σ = v log β + (1 − v) log β̃ (Nichol & Dhariwal 2021, eq. 15) with v = ``frac``: v = 1 gives β,
    v = 0 gives β̃."""
    return frac * log_large + (1 - frac) * log_small


def learned_log_variance(raw: Tensor, log_small: Tensor | float, log_large: Tensor | float) -> Tensor:
    """log Σ_θ for a network output ``raw``: v = (raw + 1)/2 in eq. 15 (raw ∈ [−1, 1] ↦ [β̃, β])."""
    return interpolate_log_variance((raw + 1) / 2, log_small, log_large)


def clipped_log(var_small: float, fallback: float) -> float:
    """log β̃, with the β̃ = 0 of the step to clean data replaced by ``fallback`` (the next step's β̃)."""
    return math.log(var_small if var_small > 0 else fallback)


def step_log_variance(kind: str, raw: Tensor | None, var_small: float, var_large: float,
                      fallback_small: float) -> Tensor | float:
    """log Σ for one reverse step: "fixed_small" β̃ (clipped), "fixed_large" β, "learned" eq. 15 with the
    network's ``raw`` v (required then)."""
    log_small, log_large = clipped_log(var_small, fallback_small), math.log(var_large)
    if kind == "fixed_small":
        return log_small
    if kind == "fixed_large":
        return log_large
    if kind != "learned":
        raise ValueError(f"unknown variance type {kind!r}: use one of {list(VARIANCE_TYPES)}")
    if raw is None:
        raise ValueError("variance 'learned' needs a model with 2C output channels (mean and v)")
    return learned_log_variance(raw, log_small, log_large)


def exact_reverse_raw_v(true_var: Tensor, var_small: Tensor | float, var_large: Tensor | float) -> Tensor:
    """The raw output r whose eq. 15 variance is ``true_var``: r = 2 (log Σ − log β̃)/(log β − log β̃) − 1
    (tests and the exact Gaussian model use it)."""
    log_small = torch.as_tensor(var_small, dtype=true_var.dtype).log()
    log_large = torch.as_tensor(var_large, dtype=true_var.dtype).log()
    return 2 * (true_var.log() - log_small) / (log_large - log_small) - 1
