"""The diffusion core: pure math over (model_fn, x, schedule), no nn.Module state, no Lightning.

* :mod:`~ldm.diffusion.schedules`  -- the NoiseSchedule interface: DiscreteSchedule (VP: linear / scaled_linear /
  cosine, zero terminal SNR) and VESchedule (NCSN's geometric σ ladder); t ⇄ σ ⇄ log-SNR, q(x_t | x_0), the
  posterior, sampling timesteps.
* :mod:`~ldm.diffusion.objectives` -- eps / v / x0 targets and conversions, loss weights, offset noise, DSM.
* :mod:`~ldm.diffusion.variance`   -- fixed and learned reverse variances (iDDPM eq. 15).
* :mod:`~ldm.diffusion.samplers`   -- ``sample(...)`` and ddpm, ddim, dpmpp-2m, euler, euler-a, heun, lcm, langevin, pc.
* :mod:`~ldm.diffusion.guidance`   -- classifier-free guidance wrapper (+ guidance rescale).
* :mod:`~ldm.diffusion.sde`        -- VP and VE SDE views: reverse-SDE and probability-flow ODE samplers.
* :mod:`~ldm.diffusion.likelihood` -- the variational bound term by term, bits/dim, the hybrid loss.
* :mod:`~ldm.diffusion.ode`        -- fixed-step Runge–Kutta and adaptive Dormand–Prince solvers.
* :mod:`~ldm.diffusion.ode_likelihood` -- PF-ODE log-likelihood with Hutchinson's trace estimator.
* :mod:`~ldm.diffusion.toy`        -- exact Gaussian denoisers and the 2-D swiss roll (``ldm toy``).
"""

from ldm.diffusion.guidance import classifier_free_guidance, guided_output
from ldm.diffusion.likelihood import VLB, hybrid_loss, variational_bound
from ldm.diffusion.objectives import (
    PREDICTION_TYPES,
    consistency_scalings,
    convert_prediction,
    diffusion_loss,
    dsm_loss,
    loss_weight,
    normalize_prediction_type,
    offset_noise,
    predict_eps,
    predict_x0,
    predict_x0_eps,
    training_target,
)
from ldm.diffusion.ode_likelihood import ode_bits_per_dim, ode_log_likelihood
from ldm.diffusion.samplers import SAMPLERS, ddim_invert, sample
from ldm.diffusion.schedules import (
    SCHEDULES,
    SPACINGS,
    DiscreteSchedule,
    NoiseSchedule,
    ScheduleConfig,
    VESchedule,
    VEScheduleConfig,
    build_schedule,
)
from ldm.diffusion.sde import VESDE, VPSDE, sample_probability_flow, sample_reverse_sde, sde_for

__all__ = [
    "NoiseSchedule", "DiscreteSchedule", "ScheduleConfig", "VESchedule", "VEScheduleConfig", "build_schedule",
    "SCHEDULES", "SPACINGS", "dsm_loss", "VLB", "variational_bound", "hybrid_loss", "ode_log_likelihood",
    "ode_bits_per_dim",
    "PREDICTION_TYPES", "normalize_prediction_type", "training_target", "predict_x0_eps", "predict_x0",
    "predict_eps", "convert_prediction", "loss_weight", "offset_noise", "diffusion_loss", "consistency_scalings",
    "SAMPLERS", "sample", "ddim_invert",
    "classifier_free_guidance", "guided_output",
    "VPSDE", "VESDE", "sde_for", "sample_reverse_sde", "sample_probability_flow",
]
