"""The diffusion core: pure math over (model_fn, x, schedule), no nn.Module state, no Lightning.

* :mod:`~ldm.diffusion.schedules`  -- DiscreteSchedule (linear / scaled_linear / cosine, zero terminal SNR),
  t ⇄ σ ⇄ log-SNR, q(x_t | x_0), the posterior, sampling timesteps.
* :mod:`~ldm.diffusion.objectives` -- eps / v / x0 targets and conversions, loss weights, offset noise.
* :mod:`~ldm.diffusion.samplers`   -- ``sample(...)`` and ddpm, ddim, dpmpp-2m, euler, euler-a, heun, lcm.
* :mod:`~ldm.diffusion.guidance`   -- classifier-free guidance wrapper (+ guidance rescale).
* :mod:`~ldm.diffusion.sde`        -- VP-SDE view: reverse-SDE and probability-flow ODE samplers.
* :mod:`~ldm.diffusion.toy`        -- exact Gaussian denoisers and the 2-D swiss roll (``ldm toy``).
"""

from ldm.diffusion.guidance import classifier_free_guidance, guided_output
from ldm.diffusion.objectives import (
    PREDICTION_TYPES,
    consistency_scalings,
    convert_prediction,
    diffusion_loss,
    loss_weight,
    normalize_prediction_type,
    offset_noise,
    predict_eps,
    predict_x0,
    predict_x0_eps,
    training_target,
)
from ldm.diffusion.samplers import SAMPLERS, ddim_invert, sample
from ldm.diffusion.schedules import SCHEDULES, SPACINGS, DiscreteSchedule, ScheduleConfig
from ldm.diffusion.sde import VPSDE, sample_probability_flow, sample_reverse_sde

__all__ = [
    "DiscreteSchedule", "ScheduleConfig", "SCHEDULES", "SPACINGS",
    "PREDICTION_TYPES", "normalize_prediction_type", "training_target", "predict_x0_eps", "predict_x0",
    "predict_eps", "convert_prediction", "loss_weight", "offset_noise", "diffusion_loss", "consistency_scalings",
    "SAMPLERS", "sample", "ddim_invert",
    "classifier_free_guidance", "guided_output",
    "VPSDE", "sample_reverse_sde", "sample_probability_flow",
]
