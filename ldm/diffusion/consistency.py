"""The pieces of Latent Consistency Distillation (Luo et al. 2023, "Latent Consistency Models", sec. 4 and
Algorithm 1) as functions of tensors; the training loop is ``ldm.models.lcm``.

* The consistency function ``f(x, t) = c_skip(t) x + c_out(t) x̂0(x, t)`` (Song et al. 2023, eq. 5; LCM eq. 8):
  the student keeps the teacher's parametrisation (ε, v or x0) and the boundary scalings of
  ``objectives.consistency_scalings`` make ``f(x, 0) = x`` exactly.
* The skipping-step solver (LCM sec. 4.3): the grid ``t_{n+k} ∈ {k−1, 2k−1, ..., T−1}`` (T/k points, DDIM's
  trailing grid) and one DDIM step (Song et al. 2021a, eq. 12 with η = 0) of the guided teacher from ``t_{n+k}``
  to ``t_n = max(t_{n+k} − k, 0)``, where the teacher's output is ``u + w (c − u)`` (LCM eq. 9 with w = 1 + ω).
* The pseudo-Huber metric ``d(x, y) = √(‖x − y‖² + c²) − c`` (Song & Dhariwal 2023, "Improved techniques for
  training consistency models", sec. 3.3) with their ``c = 0.00054 √d`` for d-dimensional samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.objectives import consistency_scalings, predict_x0, predict_x0_eps
from ldm.diffusion.schedules import DiscreteSchedule


def skipping_grid(num_train_timesteps: int, skip: int, device: torch.device | None = None) -> Tensor:
    """The solver's start timesteps ``t_{n+k}``: ``k−1, 2k−1, ..., T−1`` (long, ascending; T/k of them)."""
    if skip < 1 or num_train_timesteps % skip:
        raise ValueError(f"the skipping step k={skip} must divide num_train_timesteps={num_train_timesteps}")
    return torch.arange(1, num_train_timesteps // skip + 1, device=device) * skip - 1


def solver_end(start: Tensor, skip: int) -> Tensor:
    """``t_n = max(t_{n+k} − k, 0)``: where one skipping step from ``start`` lands (0 from the first grid point)."""
    return (start - skip).clamp(min=0)


def ddim_solver_step(output: Tensor, x: Tensor, t: Tensor, t_next: Tensor, schedule: DiscreteSchedule,
                     prediction_type: str) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021a, eq. 12, η = 0) from ``x`` at ``t`` to ``t_next`` given the
    (guided) model ``output`` at (x, t): ``x_next = α_next x̂0 + σ_next ε̂``. Per-sample timesteps (B,)."""
    alpha, sigma = schedule.alpha_sigma(t, like=x)
    x0, eps = predict_x0_eps(output, x, alpha, sigma, prediction_type)
    alpha_next, sigma_next = schedule.alpha_sigma(t_next, like=x)
    return alpha_next * x0 + sigma_next * eps


def consistency_function(output: Tensor, x: Tensor, t: Tensor, schedule: DiscreteSchedule, prediction_type: str,
                         sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> Tensor:
    """``f(x, t) = c_skip(t) x + c_out(t) x̂0`` with x̂0 from the model ``output`` (LCM eq. 8); ``f(x, 0) = x``."""
    alpha, sigma = schedule.alpha_sigma(t, like=x)
    x0 = predict_x0(output, x, alpha, sigma, prediction_type)
    c_skip, c_out = consistency_scalings(t.detach().to("cpu", torch.float64), sigma_data, timestep_scaling)
    shape = (-1,) + (1,) * (x.ndim - 1)
    c_skip, c_out = c_skip.to(x.device, x.dtype).view(shape), c_out.to(x.device, x.dtype).view(shape)
    return c_skip * x + c_out * x0


def default_huber_c(sample_shape: tuple[int, ...] | torch.Size) -> float:
    """``c = 0.00054 √d`` for samples of ``d`` elements (Song & Dhariwal 2023, sec. 3.3)."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


def pseudo_huber(prediction: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample ``√(‖prediction − target‖² + c²) − c`` (B,), in float32 or wider."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    sq = (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c
