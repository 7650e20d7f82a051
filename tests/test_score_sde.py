"""The score-based view: the VE schedule, annealed Langevin dynamics, predictor-corrector sampling and the VE SDE,
against the exact Gaussian model, with the tolerances of tests/test_samplers.py (mean < 0.05 sd, variance < 5 %)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.objectives import diffusion_loss, dsm_loss
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import DiscreteSchedule, VESchedule, VEScheduleConfig, build_schedule
from ldm.diffusion.sde import VESDE, VPSDE, sample_probability_flow, sample_reverse_sde, sde_for
from ldm.diffusion.toy import GaussianData

VP = DiscreteSchedule.from_name("scaled_linear")
VE = VESchedule(VEScheduleConfig(sigma_min=0.01, sigma_max=50.0))
DATA = GaussianData([0.5, -1.0], [1.0, 1.5])


def moments_ok(out: torch.Tensor, var_tol: float = 0.05) -> tuple[float, float]:
    mean_err = ((out.mean(0) - DATA.mean) / DATA.std).abs().max().item()
    var_err = (out.var(0) / DATA.std**2 - 1).abs().max().item()
    assert mean_err < 0.05 and var_err < var_tol, (mean_err, var_err)
    return mean_err, var_err


def run(schedule, sampler: str, steps: int, n: int = 10_000, spacing: str = "trailing", **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x_T = DATA.sample_marginal(schedule, schedule.timesteps(steps, spacing)[0].item(), n, gen)
    return sample(DATA.model_fn(schedule), x_T, schedule, steps, sampler=sampler, spacing=spacing, generator=gen, **kw)


def test_ve_schedule_is_the_geometric_ladder() -> None:
    """σ_t = σ_min (σ_max/σ_min)^{t/(T−1)}, α = 1 (Song & Ermon 2019 §4.2); fractional t is the continuous σ(t)."""
    sigmas = VE.alpha_sigma(torch.arange(1000))[1]
    assert sigmas[0].item() == pytest.approx(0.01) and sigmas[-1].item() == pytest.approx(50.0)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 5000 ** (1 / 999)))
    alpha, sigma = VE.alpha_sigma(torch.tensor([250.25]))
    assert alpha.item() == 1.0 and sigma.item() == pytest.approx(0.01 * 5000 ** (250.25 / 999), rel=1e-10)
    assert VE.t_at(VE.sigma_at(torch.tensor([3.0, 333.3]))).tolist() == pytest.approx([3.0, 333.3])
    # geometric spacing: linspace in t for VE, the same σ ladder for a VP schedule
    assert VE.timesteps(5, "geometric").tolist() == pytest.approx([999.0, 749.25, 499.5, 249.75, 0.0])
    vp_levels = VP.sigma_at(VP.timesteps(6, "geometric"))
    assert (vp_levels[1:] / vp_levels[:-1]).std().item() < 1e-6
    # posterior of a VE step: the SMLD ancestral step (Song et al. 2021b eq. 47)
    x0, x_t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
    mean, var = VE.posterior_mean_variance(x0, x_t, torch.tensor([500]))
    s_t, s_s = VE.sigmas[500].item(), VE.sigmas[499].item()
    assert var.item() == pytest.approx(s_s**2 * (s_t**2 - s_s**2) / s_t**2)
    assert mean.item() == pytest.approx(x_t.item() + (s_t**2 - s_s**2) * (0.3 - 2.0) / s_t**2)
    assert VE.prior_std == 50.0 and VP.prior_std == 1.0
    scale = VE.scale_model_input(torch.ones(2, 3), torch.tensor([0, 999]))
    assert scale[1, 0].item() == pytest.approx(1 / math.sqrt(1 + 2500))  # c_in (Karras et al. 2022 Table 1)
    assert torch.equal(VP.scale_model_input(torch.ones(2, 3), torch.tensor([0, 999])), torch.ones(2, 3))


def test_schedule_configs_round_trip_and_errors() -> None:
    ve = build_schedule({"name": "ve", "sigma_max": 10.0, "num_train_timesteps": 100})
    assert isinstance(ve, VESchedule) and ve.config.sigma_max == 10.0
    assert isinstance(build_schedule(ve.to_config()), VESchedule)
    assert isinstance(build_schedule({"name": "cosine"}), DiscreteSchedule)
    with pytest.raises(ValueError, match="v-prediction"):
        build_schedule({"name": "ve", "prediction_type": "v"})
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        build_schedule({"name": "ve", "sigma_min": 2.0, "sigma_max": 1.0})
    with pytest.raises(ValueError, match="names class"):
        build_schedule({"name": "ve", "_class_name": "DiscreteSchedule"})


@pytest.mark.parametrize("schedule", [VP, VE], ids=["vp", "ve"])
def test_annealed_langevin_reproduces_gaussian_moments(schedule) -> None:
    """Song & Ermon 2019 Algorithm 1 over a 50-level geometric ladder, 20 steps per level (α_i = σ_i²)."""
    assert "langevin" in SAMPLERS
    moments_ok(run(schedule, "langevin", 50, spacing="geometric", n_steps_each=20, step_scale=1.0))


@pytest.mark.parametrize("schedule", [VP, VE], ids=["vp", "ve"])
def test_predictor_corrector_reproduces_gaussian_moments(schedule) -> None:
    """Song et al. 2021b Algorithm 2: reverse-diffusion predictor + Langevin corrector (snr 0.16); the predictor
    alone (Euler–Maruyama of the reverse SDE, variance bias O(step)) needs more steps for the same tolerance."""
    moments_ok(run(schedule, "pc", 200))
    moments_ok(run(schedule, "pc", 400, corrector_steps=0))


def test_ve_sde_samplers_reproduce_gaussian_moments() -> None:
    assert isinstance(sde_for(VE), VESDE) and isinstance(sde_for(VP), VPSDE)
    gen = torch.Generator().manual_seed(0)
    x_T = DATA.sample_marginal(VE, 999, 8000, gen)
    moments_ok(sample_reverse_sde(DATA.model_fn(VE), x_T, VE, 300, generator=gen), 0.06)
    alpha, sigma = VE.alpha_sigma(torch.tensor(999.0, dtype=torch.float64))
    m, s = DATA.marginal(float(alpha), float(sigma))
    out = sample_probability_flow(DATA.model_fn(VE), torch.stack([m, m + s]), VE, 100)  # affine: exact moments
    assert ((out[0] - DATA.mean) / DATA.std).abs().max() < 1e-6
    assert (((out[1] - out[0]) ** 2) / DATA.std**2 - 1).abs().max() < 0.01
    # g(τ)² = dσ²/dτ: the integral of g² over [k, k+1] is σ_{k+1}² − σ_k²
    sde = VESDE(VE)
    n, k = 200, 500
    integral = sum(sde.drift_diffusion(torch.zeros(1), k + (j + 0.5) / n)[1] ** 2 for j in range(n)) / n
    assert integral == pytest.approx(VE.sigmas[k + 1].item() ** 2 - VE.sigmas[k].item() ** 2, rel=1e-4)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "heun", "ddpm", "euler-a"])
def test_vp_samplers_run_on_a_ve_schedule(name: str) -> None:
    """The samplers speak the schedule interface, so the VE ladder needs nothing special."""
    tol = {"ddim": 0.08, "ddpm": 0.08, "euler-a": 0.08}.get(name, 0.05)
    moments_ok(run(VE, name, 100), tol)


def test_dsm_loss_is_sigma_weighted_and_equals_eps_mse() -> None:
    """Denoising score matching with λ(σ) = σ² (Song & Ermon 2019 eq. 5-6) is the ε-MSE of L_simple for s = −ε̂/σ."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=gen)
    noise = torch.randn(16, 3, generator=gen)
    t = torch.randint(0, 1000, (16,), generator=gen)
    eps_hat = torch.randn(16, 3, generator=gen)
    sigma = VE.alpha_sigma(t, like=x0)[1]
    x_t = VE.q_sample(x0, t, noise)
    score = -eps_hat / sigma
    loss = dsm_loss(score, x_t, x0, sigma)
    expected = 0.5 * ((score + (x_t - x0) / sigma**2) ** 2 * sigma**2).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * 3 * diffusion_loss(eps_hat, x0, noise, t, VE).item(), rel=1e-6)
