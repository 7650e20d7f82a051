"""What the denoiser predicts and how its training loss is weighted.

Notation (DDPM eq. 4): ``x_t = α_t x_0 + σ_t ε`` with ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)``,
so ``α_t² + σ_t² = 1`` and ``SNR(t) = α_t² / σ_t²``. A model predicts one of

* ``"eps"`` -- the noise ε (DDPM eq. 14, L_simple),
* ``"v"``   -- the velocity ``v = α_t ε − σ_t x_0`` (Salimans & Ho 2022, §4 and App. D),
* ``"x0"``  -- the clean sample x_0.

Given ``x_t`` every one of them determines the other two by an affine map, so samplers convert
any model output to ``(x0, eps)`` with :func:`predict_x0_eps`. diffusers' names (``"epsilon"``,
``"v_prediction"``, ``"sample"``) are accepted everywhere as aliases.

``alpha``/``sigma`` arguments are floats or tensors that broadcast against ``x_t``
(``schedule.alpha_sigma(t, like=x)`` returns them in that shape).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # only for type hints: schedules imports this module
    from ldm.diffusion.schedules import DiscreteSchedule

PREDICTION_TYPES = ("eps", "v", "x0")
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
LOSS_WEIGHTINGS = ("uniform", "min_snr")

Coef = float | Tensor


def normalize_prediction_type(name: str) -> str:
    """Canonical prediction type ("eps", "v" or "x0") for ``name`` or one of diffusers' aliases."""
    canonical = _ALIASES.get(name, name)
    if canonical not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {name!r}: use one of {list(PREDICTION_TYPES)} "
                         f"(or diffusers' {list(_ALIASES)})")
    return canonical


def training_target(x0: Tensor, noise: Tensor, alpha: Coef, sigma: Coef, prediction_type: str) -> Tensor:
    """The regression target for ``x_t = α x0 + σ noise``: ε (DDPM eq. 14), v = α ε − σ x0
    (Salimans & Ho 2022, §4) or x0."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "eps":
        return noise
    if kind == "v":
        return alpha * noise - sigma * x0
    return x0


def predict_x0_eps(output: Tensor, x_t: Tensor, alpha: Coef, sigma: Coef,
                   prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(x0, eps)`` implied by a model ``output`` at ``x_t = α x0 + σ ε``.

    eps: x0 = (x_t − σ ε)/α (DDPM eq. 4 solved for x0, DDIM eq. 9); x0: ε = (x_t − α x0)/σ;
    v: x0 = α x_t − σ v and ε = σ x_t + α v (Salimans & Ho 2022, App. D, using α² + σ² = 1).
    From eps the x0 is undefined where α = 0 (zero terminal SNR): train "v" or "x0" there.
    """
    kind = normalize_prediction_type(prediction_type)
    if kind == "eps":
        return (x_t - sigma * output) / alpha, output
    if kind == "v":
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    return output, (x_t - alpha * output) / sigma


def predict_x0(output: Tensor, x_t: Tensor, alpha: Coef, sigma: Coef, prediction_type: str) -> Tensor:
    """x0 implied by a model output (see :func:`predict_x0_eps`)."""
    return predict_x0_eps(output, x_t, alpha, sigma, prediction_type)[0]


def predict_eps(output: Tensor, x_t: Tensor, alpha: Coef, sigma: Coef, prediction_type: str) -> Tensor:
    """ε implied by a model output (see :func:`predict_x0_eps`)."""
    return predict_x0_eps(output, x_t, alpha, sigma, prediction_type)[1]


def convert_prediction(output: Tensor, x_t: Tensor, alpha: Coef, sigma: Coef, source: str, target: str) -> Tensor:
    """Re-express a model output of type ``source`` as type ``target`` (exact, affine in ``output``)."""
    x0, eps = predict_x0_eps(output, x_t, alpha, sigma, source)
    return training_target(x0, eps, alpha, sigma, target)


def loss_weight(snr: Tensor, prediction_type: str, weighting: str = "uniform", gamma: float = 5.0) -> Tensor:
    """Per-sample weight of the MSE on the ``prediction_type`` target.

    ``"uniform"``: 1 (L_simple, DDPM eq. 14). ``"min_snr"``: Min-SNR-γ (Hang et al. 2023, §3.4)
    weights the x0-space error by ``min(SNR, γ)``. Since ``‖ε − ε̂‖² = SNR ‖x0 − x̂0‖²`` and
    ``‖v − v̂‖² = (SNR + 1) ‖x0 − x̂0‖²``, the weight on the target's own MSE is
    ``min(SNR, γ)/SNR`` for eps (→ 1 as SNR → 0, so no 0/0 at zero terminal SNR),
    ``min(SNR, γ)/(SNR + 1)`` for v and ``min(SNR, γ)`` for x0.
    """
    kind = normalize_prediction_type(prediction_type)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}: use one of {list(LOSS_WEIGHTINGS)}")
    if gamma <= 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if kind == "eps":  # min(SNR, γ)/SNR = γ/max(SNR, γ): finite (= 1) at SNR = 0
        return gamma / snr.clamp(min=gamma)
    if kind == "v":
        return clipped / (snr + 1)
    return clipped


def offset_noise(x0: Tensor, strength: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise for training, with optional offset noise (Guttenberg 2023, "Diffusion with
    offset noise"): ``ε = n + strength · m`` with ``m`` one draw per sample and channel (shape
    ``(B, C, 1, ..., 1)``), so the model also learns to change the mean of a channel.
    With ``strength = 0`` this is plain ``N(0, I)``."""
    noise = standard_normal(x0.shape, x0, generator)
    if strength:
        if x0.ndim < 3:
            raise ValueError(f"offset noise needs (B, C, ...) inputs with spatial dims, got shape {tuple(x0.shape)}")
        shape = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)
        noise = noise + strength * standard_normal(shape, x0, generator)
    return noise


def diffusion_loss(output: Tensor, x0: Tensor, noise: Tensor, t: Tensor, schedule: DiscreteSchedule,
                   prediction_type: str = "eps", weighting: str = "uniform", gamma: float = 5.0) -> Tensor:
    """Weighted denoising loss ``E_t[w(t) ‖target − output‖²]`` for ``x_t = q_sample(x0, t, noise)``
    (DDPM eq. 14 for uniform eps; Min-SNR-γ weights from :func:`loss_weight`). Scalar, float32 or wider."""
    if output.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} != input shape {tuple(x0.shape)}")
    alpha, sigma = schedule.alpha_sigma(t, like=x0)
    target = training_target(x0, noise, alpha, sigma, prediction_type)
    dtype = torch.promote_types(output.dtype, torch.float32)
    per_sample = (output.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    a, s = schedule.alpha_sigma(t, like=per_sample)
    weights = loss_weight(a.pow(2) / s.pow(2), prediction_type, weighting, gamma)
    return (weights * per_sample).mean()


def dsm_loss(score: Tensor, x_t: Tensor, x0: Tensor, sigma: Coef, alpha: Coef = 1.0) -> Tensor:
    """Denoising score matching with the σ²-weighting of NCSN: λ(σ) ℓ(θ; σ), ℓ = ½ ‖s_θ(x̃, σ) − ∇ log q(x̃ | x)‖²,
    ∇ log q(x̃ | x) = −(x̃ − α x)/σ², λ(σ) = σ² (Vincent 2011; Song & Ermon 2019 eq. 5-6, with α = 1 for their
    x̃ = x + σ z). Summed over dimensions, averaged over the batch. For s_θ = −ε̂/σ it equals ½ ‖ε̂ − ε‖²,
    DDPM's L_simple (Ho et al. 2020 §3.2), which is why an ε-model trained by :func:`diffusion_loss` is the
    σ-weighted score model on any schedule, VE or VP."""
    target = -(x_t - alpha * x0) / sigma**2
    dtype = torch.promote_types(score.dtype, torch.float32)
    per_sample = (sigma**2 * (score.to(dtype) - target.to(dtype)).pow(2)).flatten(1).sum(1)
    return 0.5 * per_sample.mean()


def consistency_scalings(t: Tensor | float, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """Boundary-condition scalings ``f(x, t) = c_skip(t) x + c_out(t) x̂0`` of a consistency model
    (Song et al. 2023, eq. 5; LCM, Luo et al. 2023, uses the same form on the x̂0 of an ε/v model),
    in the discrete-time form of LCM's reference implementation: ``c_skip = σ_d² / ((k t)² + σ_d²)``,
    ``c_out = k t / √((k t)² + σ_d²)`` with ``k = timestep_scaling``. ``c_skip(0) = 1``, ``c_out(0) = 0``, so
    f(x, 0) = x."""
    scaled = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def standard_normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, I)`` of ``shape`` in ``like``'s dtype/device, drawn from ``generator`` wherever it lives.
    Always drawn in float32, so one seed gives the same noise whatever the sampling dtype."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)
