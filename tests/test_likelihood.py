"""Learned variance, the variational bound in bits/dim and the probability-flow likelihood, against closed forms
for Gaussian data with the exact denoiser (x0 ~ N(μ, diag s²))."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.likelihood import (
    LN2,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    kl_timesteps_for,
    mean_and_standard_error,
    normal_kl,
    quantize,
    variational_bound,
    vlb_term,
)
from ldm.diffusion.ode import integrate
from ldm.diffusion.ode_likelihood import (
    draw_probes,
    exact_divergence,
    hutchinson_divergence,
    ode_bits_per_dim,
    ode_log_likelihood,
)
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedules import DiscreteSchedule, VESchedule, VEScheduleConfig
from ldm.diffusion.toy import GaussianData
from ldm.diffusion.variance import interpolate_log_variance, learned_log_variance, split_output, step_log_variance

SCHEDULE = DiscreteSchedule.from_name("scaled_linear")
DATA = GaussianData([0.5, -1.0], [0.8, 1.5])


def data_samples(n: int, data: GaussianData = DATA, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return data.mean + data.std * torch.randn(n, len(data.mean), generator=gen, dtype=torch.float64)


# ---- learned variance ------------------------------------------------------------------------------------
def test_learned_variance_interpolates_between_beta_tilde_and_beta() -> None:
    """Σ = exp(v log β + (1 − v) log β̃) (iDDPM eq. 15): v = 1 gives β_t, v = 0 gives β̃_t; raw r = 2v − 1."""
    t = 500
    beta = SCHEDULE.betas[t].item()
    abar_t, abar_s = SCHEDULE.alphas_cumprod[t].item(), SCHEDULE.alphas_cumprod[t - 1].item()
    beta_tilde = (1 - abar_s) / (1 - abar_t) * beta  # DDPM eq. 7
    log_small, log_large = math.log(beta_tilde), math.log(beta)
    assert math.exp(interpolate_log_variance(1.0, log_small, log_large)) == pytest.approx(beta, rel=1e-12)
    assert math.exp(interpolate_log_variance(0.0, log_small, log_large)) == pytest.approx(beta_tilde, rel=1e-12)
    raw = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    got = learned_log_variance(raw, log_small, log_large).exp()
    torch.testing.assert_close(got, torch.tensor([beta, beta_tilde, math.sqrt(beta * beta_tilde)], dtype=torch.float64))
    # the sampler's per-step variance reads the same ends from the (respaced) posterior
    assert step_log_variance("fixed_small", None, beta_tilde, beta, 1.0) == pytest.approx(log_small)
    assert step_log_variance("fixed_large", None, beta_tilde, beta, 1.0) == pytest.approx(log_large)
    with pytest.raises(ValueError, match="2C output channels"):
        step_log_variance("learned", None, beta_tilde, beta, 1.0)


def test_split_output_checks_channels() -> None:
    x = torch.zeros(2, 3, 4, 4)
    mean, v = split_output(torch.ones(2, 6, 4, 4), 3)
    assert mean.shape == v.shape == x.shape
    assert split_output(torch.ones(2, 3, 4, 4), 3)[1] is None
    with pytest.raises(ValueError, match="neither 3 channels"):
        split_output(torch.ones(2, 5, 4, 4), 3)


def test_learned_variance_beats_fixed_variance_with_few_steps() -> None:
    """Strided ancestral sampling (iDDPM §4): with the exact learned variance (respaced ends, same v) the output
    variance at 50 steps is far closer to the data's than with β̃, which under-disperses (≈ −11 %)."""
    data = GaussianData([0.5, -1.0], [1.0, 0.7])
    gen = torch.Generator().manual_seed(0)
    x_T = data.sample_marginal(SCHEDULE, SCHEDULE.timesteps(50)[0].item(), 20_000, gen)
    errors = {}
    for name, fn in (("fixed_small", data.model_fn(SCHEDULE)), ("learned", data.learned_variance_fn(SCHEDULE))):
        out = sample(fn, x_T, SCHEDULE, 50, sampler="ddpm", generator=torch.Generator().manual_seed(1))
        assert ((out.mean(0) - data.mean) / data.std).abs().max() < 0.05
        errors[name] = (out.var(0) / data.std**2 - 1).abs().max().item()
    assert errors["fixed_small"] > 0.1 and errors["learned"] < 0.06, errors
    full = sample(data.learned_variance_fn(SCHEDULE), x_T[:3000], SCHEDULE, 1000, sampler="ddpm",
                  generator=torch.Generator().manual_seed(2))
    assert (full.var(0) / data.std**2 - 1).abs().max() < 0.06  # unit steps: p_θ(x_{t−1}|x_t) = q(x_{t−1}|x_t)


# ---- the variational bound ----------------------------------------------------------------------------------
def test_vlb_of_exact_model_is_the_gaussian_nll() -> None:
    """With the exact mean and variance, p_θ(x_{t−1}|x_t) = q(x_{t−1}|x_t), so L_vlb = −log q(x0) up to the
    prior's KL (≈ 1e-2 nats here), within its Monte-Carlo error (x_t drawn per term). Fixed variances give a
    looser bound."""
    x = data_samples(300)
    vlb = variational_bound(DATA.learned_variance_fn(SCHEDULE), x, SCHEDULE, decoder="gaussian", chunk=1000,
                            generator=torch.Generator().manual_seed(1))
    gap, se = mean_and_standard_error(vlb.total + DATA.log_prob(x))
    assert abs(gap) < 3 * se and se < 0.1
    assert vlb.kl_terms.shape == (300, 999) and vlb.prior.mean().item() < 0.02
    fixed = variational_bound(DATA.model_fn(SCHEDULE), x, SCHEDULE, decoder="gaussian", chunk=1000,
                              generator=torch.Generator().manual_seed(1))
    assert fixed.total.mean().item() > -DATA.log_prob(x).mean().item() + 0.3


def test_vlb_discretized_decoder_on_8bit_gaussian_data() -> None:
    """8-bit data in [−1, 1]: the bound with the discretized decoder (DDPM eq. 13) is −log P(bin) in bits/dim,
    within 1 % (the Monte-Carlo error of 600 samples is ≈ 0.4 %)."""
    data = GaussianData([0.1, -0.2], [0.3, 0.2])
    x = quantize(data_samples(600, data, seed=3))
    vlb = variational_bound(data.learned_variance_fn(SCHEDULE), x, SCHEDULE, decoder="discretized", chunk=1000,
                            generator=torch.Generator().manual_seed(2))
    delta = 1 / 255
    normal = torch.distributions.Normal(data.mean, data.std)
    analytic = -torch.log(normal.cdf(x + delta) - normal.cdf(x - delta)).sum(1).mean().item() / (2 * LN2)
    assert vlb.bits_per_dim().mean().item() == pytest.approx(analytic, rel=0.01)


def test_importance_sampled_and_stratified_vlb_are_unbiased() -> None:
    x = data_samples(200, seed=5)
    fn = DATA.learned_variance_fn(SCHEDULE)
    full = variational_bound(fn, x, SCHEDULE, decoder="gaussian", chunk=200, generator=torch.Generator().manual_seed(0))
    per_t = full.kl_terms.mean(0)
    strat = variational_bound(fn, x.repeat(10, 1), SCHEDULE, decoder="gaussian", timesteps=16, chunk=16,
                              generator=torch.Generator().manual_seed(1))
    proposal = per_t.abs().sqrt() + 1e-3  # iDDPM: π(t) ∝ √E[L_t²]
    imp = variational_bound(fn, x.repeat(10, 1), SCHEDULE, decoder="gaussian", timesteps=16, proposal=proposal,
                            chunk=16, generator=torch.Generator().manual_seed(2))
    exact = full.kl.mean().item()
    for estimate in (strat, imp):
        mean, se = mean_and_standard_error(estimate.kl)
        assert abs(mean - exact) < 4 * se + 0.01, (mean, se, exact)
    # weights: exhaustive sums every term once; stratified weights add up to T − 1
    ts, w = kl_timesteps_for(3, 1000, 16, None, torch.Generator().manual_seed(0))
    assert ts.shape == (3, 16) and torch.equal(w.sum(1), torch.full((3,), 999.0, dtype=torch.float64))
    assert int(ts.min()) >= 1 and int(ts.max()) <= 999


def test_discretized_gaussian_is_a_distribution_over_the_bins() -> None:
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, logvar in ((0.3, math.log(0.01)), (-0.99, math.log(1e-6)), (0.0, math.log(4.0))):
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), logvar)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    far = discretized_gaussian_log_likelihood(torch.tensor([0.5], dtype=torch.float64), torch.tensor([-0.5]).double(),
                                              math.log(1e-4))
    assert torch.isfinite(far).all() and far.item() < -4000  # tails in log space, no underflow to −inf


def test_normal_kl_closed_form() -> None:
    m1, m2 = torch.tensor([0.3]), torch.tensor([-0.1])
    kl = normal_kl(m1, math.log(0.5), m2, math.log(2.0))
    expected = math.log(2.0 / 0.5) / 2 + (0.5 + 0.4**2) / (2 * 2.0) - 0.5
    assert kl.item() == pytest.approx(expected, rel=1e-6)


def test_hybrid_loss_trains_the_variance_not_the_mean_through_vlb() -> None:
    """L_hybrid = L_simple + λ T L_t with a stop-gradient on μ in L_vlb (iDDPM eq. 16, §3.1)."""
    gen = torch.Generator().manual_seed(0)
    x0 = quantize(0.5 * torch.randn(8, 3, 4, 4, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 900, 999])
    out = torch.randn(8, 6, 4, 4, generator=gen).requires_grad_(True)
    loss = hybrid_loss(out, x0, noise, t, SCHEDULE)
    loss.backward()
    grad_mean_hybrid = out.grad[:, :3].clone()
    out.grad = None
    simple = (out[:, :3] - noise).pow(2).mean()
    simple.backward()
    torch.testing.assert_close(grad_mean_hybrid, out.grad[:, :3])  # the mean only sees L_simple
    assert out.grad[:, 3:].abs().sum() == 0
    out2 = out.detach().clone().requires_grad_(True)
    hybrid_loss(out2, x0, noise, t, SCHEDULE).backward()
    assert out2.grad[:, 3:].abs().sum() > 0  # ... and v is trained by λ L_vlb
    x_t = SCHEDULE.q_sample(x0, t, noise)
    vb = vlb_term(out.detach(), x0, x_t, t, SCHEDULE).mean() / x0[0].numel()
    assert loss.item() == pytest.approx(simple.item() + 0.001 * 1000 * vb.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2C output channels"):
        hybrid_loss(out[:, :3], x0, noise, t, SCHEDULE)


# ---- probability-flow likelihood -----------------------------------------------------------------------------
def test_hutchinson_estimator_is_unbiased() -> None:
    """E_v[vᵀ A v] = tr A for Rademacher and Gaussian probes; vectorised over probes; exact trace beside it."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    fn = lambda y: y @ a.T + y.pow(2)  # noqa: E731 - Jacobian A + 2 diag(y)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    exact = torch.diagonal(a).sum() + 2 * x.sum(1)
    out, div = exact_divergence(fn, x)
    torch.testing.assert_close(div, exact)
    torch.testing.assert_close(out, fn(x))
    for kind in ("rademacher", "gaussian"):
        probes = draw_probes(20_000, x, kind, torch.Generator().manual_seed(1))
        _, est = hutchinson_divergence(fn, x, probes)
        assert (est - exact).abs().max().item() < 0.1 * exact.abs().max().item() + 0.05
    with pytest.raises(ValueError, match="unknown probe"):
        draw_probes(1, x, "sphere")


@pytest.mark.parametrize("schedule", [SCHEDULE, DiscreteSchedule.from_name("cosine"),
                                      VESchedule(VEScheduleConfig(sigma_max=20.0))], ids=["vp", "cosine", "ve"])
def test_pf_ode_log_likelihood_is_the_gaussian_log_density(schedule) -> None:
    """Song et al. 2021b eq. 39: log p_0(x) = log p_T(x(T)) + ∫ ∇·f̃ equals the exact flow model's log-density
    (the data Gaussian pushed through its PF-ODE onto the N(0, prior_std²) prior) within 1 %, per sample;
    Rademacher probes are exact on the model's diagonal Jacobian. On average it is the data's log-density."""
    x = data_samples(64, seed=7)
    model_density, true = DATA.flow_log_prob(x, schedule), DATA.log_prob(x)
    fixed = ode_log_likelihood(DATA.model_fn(schedule), x, schedule, method="rk4", steps=40, probes=1)
    adaptive = ode_log_likelihood(DATA.model_fn(schedule), x, schedule, method="dopri5", rtol=1e-5, atol=1e-5)
    for result in (fixed, adaptive):
        assert ((result.log_p - model_density).abs() / model_density.abs()).max().item() < 0.01
        assert result.log_p.mean().item() == pytest.approx(true.mean().item(), rel=0.01)
    assert fixed.nfe == 160 and adaptive.nfe > 10


def test_pf_ode_gaussian_probes_average_to_the_log_density() -> None:
    """Gaussian probes are not exact per draw, but unbiased: the average over 200 solves is within 4 standard
    errors of the exact model's log-density."""
    x = data_samples(8, seed=8)
    result = ode_log_likelihood(DATA.model_fn(SCHEDULE), x.repeat(200, 1), SCHEDULE, method="heun", steps=30,
                                probes=1, probe="gaussian", generator=torch.Generator().manual_seed(0))
    draws = result.log_p.view(200, 8)
    se = draws.std(0) / math.sqrt(200)
    assert ((draws.mean(0) - DATA.flow_log_prob(x, SCHEDULE)).abs() < 4 * se + 0.01).all()
    assert (draws.std(0) > 0.05).all()  # ... whereas each draw alone is noisy


def test_ode_and_elbo_bits_per_dim_agree_for_the_exact_model() -> None:
    """Same model, two likelihoods on 8-bit data: dequantized ODE bits/dim ≈ the VLB with the exact variance."""
    data = GaussianData([0.1, -0.2], [0.3, 0.2])
    x = quantize(data_samples(200, data, seed=4))
    schedule = DiscreteSchedule.from_name("cosine")
    vlb = variational_bound(data.learned_variance_fn(schedule), x, schedule, chunk=200,
                            generator=torch.Generator().manual_seed(0)).bits_per_dim().mean().item()
    ode, _ = ode_bits_per_dim(data.model_fn(schedule), x, schedule, method="rk4", steps=40,
                              generator=torch.Generator().manual_seed(1))
    assert ode.mean().item() == pytest.approx(vlb, rel=0.02)


def test_ode_solvers_orders() -> None:
    """y' = −t y: Euler/Heun/RK4 errors fall like h, h², h⁴; dopri5 meets its tolerance; reverse direction works."""
    f = lambda t, s: (-t * s[0],)  # noqa: E731
    y0 = (torch.ones(1, dtype=torch.float64),)
    truth = math.exp(-2.0)
    for method, order in (("euler", 1), ("heun", 2), ("rk4", 4)):
        e1 = abs(integrate(f, y0, 0.0, 2.0, method, steps=20)[0][0].item() - truth)
        e2 = abs(integrate(f, y0, 0.0, 2.0, method, steps=40)[0][0].item() - truth)
        assert e1 / e2 == pytest.approx(2**order, rel=0.25), method
    (y,), nfe = integrate(f, y0, 0.0, 2.0, "dopri5", rtol=1e-8, atol=1e-8)
    assert abs(y.item() - truth) < 1e-7 and nfe < 400
    (back,), _ = integrate(f, (y,), 2.0, 0.0, "dopri5", rtol=1e-8, atol=1e-8)
    assert back.item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown ODE method"):
        integrate(f, y0, 0.0, 1.0, "rk45")
