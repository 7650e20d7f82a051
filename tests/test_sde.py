"""VP-SDE view of the discrete schedule: marginals, β(τ), score, reverse-SDE and PF-ODE samplers
against the exact Gaussian model."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.samplers import Predictor
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.sde import VPSDE, sample_probability_flow, sample_reverse_sde
from ldm.diffusion.toy import GaussianData

SCHEDULE = DiscreteSchedule.from_name("scaled_linear")
DATA = GaussianData([0.5, -1.0], [1.0, 1.5])


def test_beta_integrates_to_the_discrete_steps() -> None:
    """∫_k^{k+1} β(τ) dτ = −log(ᾱ_{k+1}/ᾱ_k): the SDE's marginals are the schedule's (Song et al. 2021b eq. 29)."""
    sde = VPSDE(SCHEDULE)
    ac = SCHEDULE.alphas_cumprod
    for k in (0, 10, 500, 997):
        n = 200  # midpoint rule
        integral = sum(sde.beta(k + (j + 0.5) / n) for j in range(n)) / n
        assert integral == pytest.approx(-math.log(ac[k + 1].item() / ac[k].item()), rel=1e-5)
    # per unit of τ, β is close to the discrete β_t (the continuous limit)
    assert sde.beta(500.5) == pytest.approx(SCHEDULE.betas[500].item(), rel=0.02)
    alpha, sigma = sde.marginal(300)
    assert alpha**2 == pytest.approx(ac[300].item(), rel=1e-12) and alpha**2 + sigma**2 == pytest.approx(1.0)


def test_score_from_eps_is_the_gaussian_score() -> None:
    sde = VPSDE(SCHEDULE)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind in ("eps", "v", "x0"):
        predict = Predictor(DATA.model_fn(SCHEDULE, kind), kind, x)
        for tau in (3.0, 250.5, 900.0):
            alpha, sigma = sde.marginal(tau)
            mean, std = DATA.marginal(alpha, sigma)
            torch.testing.assert_close(sde.score(predict, x, tau), -(x - mean) / std**2, rtol=1e-10, atol=1e-10)


def test_probability_flow_ode_reproduces_gaussian_moments() -> None:
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor(999.0, dtype=torch.float64))
    m, s = DATA.marginal(float(alpha), float(sigma))
    x = torch.stack([m, m + s])  # PF-ODE is an affine map for this model: two points give exact moments
    mean_errors, var_errors = [], []
    for steps in (10, 50):  # Heun in τ: both errors shrink like h²
        out = sample_probability_flow(DATA.model_fn(SCHEDULE), x, SCHEDULE, steps)
        mean_errors.append(((out[0] - DATA.mean) / DATA.std).abs().max().item())
        var_errors.append(((out[1] - out[0]) ** 2 / DATA.std**2 - 1).abs().max().item())
    assert mean_errors[0] < 0.01 and mean_errors[1] < 1e-3 and mean_errors[1] < mean_errors[0] / 10
    assert var_errors[0] < 0.02 and var_errors[1] < 0.005 and var_errors[1] < var_errors[0]
    v = sample_probability_flow(DATA.model_fn(SCHEDULE, "v"), x, SCHEDULE, 10, prediction_type="v")
    torch.testing.assert_close(v, sample_probability_flow(DATA.model_fn(SCHEDULE), x, SCHEDULE, 10),
                               rtol=1e-9, atol=1e-9)


def test_reverse_sde_reproduces_gaussian_moments() -> None:
    gen = torch.Generator().manual_seed(0)
    x_T = DATA.sample_marginal(SCHEDULE, 999, 8000, gen)
    out = sample_reverse_sde(DATA.model_fn(SCHEDULE), x_T, SCHEDULE, 500, generator=gen)
    assert ((out.mean(0) - DATA.mean) / DATA.std).abs().max().item() < 0.05
    assert (out.var(0) / DATA.std**2 - 1).abs().max().item() < 0.06
    same = sample_reverse_sde(DATA.model_fn(SCHEDULE), x_T[:16], SCHEDULE, 20,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(same, sample_reverse_sde(DATA.model_fn(SCHEDULE), x_T[:16], SCHEDULE, 20,
                                                generator=torch.Generator().manual_seed(3)))


def test_sde_samplers_keep_dtype_and_reject_bad_steps() -> None:
    x = torch.randn(4, 2)
    assert sample_probability_flow(DATA.model_fn(SCHEDULE), x, SCHEDULE, 3).dtype == torch.float32
    assert sample_reverse_sde(DATA.model_fn(SCHEDULE), x.double(), SCHEDULE, 3).dtype == torch.float64
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample_reverse_sde(DATA.model_fn(SCHEDULE), x, SCHEDULE, 0)
