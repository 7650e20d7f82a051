"""Schedules: closed-form values, zero terminal SNR, posterior (DDPM eq. 6-7), t ⇄ σ ⇄ log-SNR,
timestep spacings and config round trips; parity of the tables with diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.schedules import SCHEDULES, TERMINAL_ALPHA_CUMPROD_FLOOR, DiscreteSchedule, ScheduleConfig
from ldm.io import PartError

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name: str, zero_snr: bool) -> None:
    s = DiscreteSchedule.from_name(name, zero_terminal_snr=zero_snr)
    ac = s.alphas_cumprod
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    assert bool((ac[1:] < ac[:-1]).all())
    assert 0 < ac[0] < 1 and ac[-1] >= 0
    assert bool(((s.betas > 0) & (s.betas <= 1)).all())
    torch.testing.assert_close(torch.cumprod(1 - s.betas, 0)[:-1], ac[:-1], rtol=1e-12, atol=0)


def test_linear_and_scaled_linear_endpoints() -> None:
    lin = DiscreteSchedule.from_name("linear")
    assert (lin.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
            and lin.betas[-1].item() == pytest.approx(0.02, rel=1e-12))
    sl = DiscreteSchedule.from_name("scaled_linear")
    assert (sl.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
            and sl.betas[-1].item() == pytest.approx(0.012, rel=1e-12))
    # √β is linear in t for scaled_linear
    root = sl.betas.sqrt()
    torch.testing.assert_close(root[1:] - root[:-1],
                               torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=torch.float64))


def test_cosine_schedule_known_values() -> None:
    s = DiscreteSchedule.from_name("cosine")

    def f(t: float) -> float:  # iDDPM eq. 17
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (1, 250, 500, 750):  # DDPM's t is index t-1 here; no clipping happens below t = 990
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-12)
    assert s.alphas_cumprod[499].item() == pytest.approx(0.493844, abs=1e-6)  # t = T/2: just under ½
    assert s.betas[-1].item() == pytest.approx(0.999)  # clipped at max_beta


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_keeps_first_and_zeroes_last(name: str) -> None:
    base = DiscreteSchedule.from_name(name)
    z = DiscreteSchedule.from_name(name, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0 and z.snr[-1].item() == 0.0
    assert z.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert math.isinf(z.sigmas[-1].item()) and math.isinf(-z.log_snr[-1].item())
    # sigma-space conversions use the finite stand-in for ᾱ = 0, integer lookups stay exact
    floor = TERMINAL_ALPHA_CUMPROD_FLOOR
    assert z.sigma_at(999.0).item() == pytest.approx(math.sqrt((1 - floor) / floor), rel=1e-12)
    alpha, sigma = z.alpha_sigma(torch.tensor([999]))
    assert alpha.item() == 0.0 and sigma.item() == 1.0


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_match_diffusers(name: str, zero_snr: bool) -> None:
    ours = DiscreteSchedule.from_name(name, zero_terminal_snr=zero_snr)
    ref = diffusers.DDPMScheduler(**ours.to_diffusers_config())  # diffusers computes in float32
    atol = 5e-6 if zero_snr else 1e-7
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=2e-5, atol=atol)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-6)
    if zero_snr:  # the rescale itself, in float64 on both sides: identical up to rounding
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        base = DiscreteSchedule.from_name(name).betas
        torch.testing.assert_close(ours.betas, rescale_zero_terminal_snr(base.clone()), rtol=1e-12, atol=1e-15)


def test_posterior_matches_ddpm_eq7_on_random_inputs() -> None:
    s = DiscreteSchedule.from_name("linear")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    xt = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 5, 99, 500, 998, 999])
    mean, var = s.posterior_mean_variance(x0, xt, t)
    ac, beta, alpha = s.alphas_cumprod[t], s.betas[t], s.alphas[t]
    ac_prev = s.alphas_cumprod[t - 1]
    shape = (-1, 1, 1, 1)
    expect_mean = ((ac_prev.sqrt() * beta / (1 - ac)).view(shape) * x0
                   + (alpha.sqrt() * (1 - ac_prev) / (1 - ac)).view(shape) * xt)
    torch.testing.assert_close(mean, expect_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ((1 - ac_prev) / (1 - ac) * beta).view(shape), rtol=1e-12, atol=0)
    # t = 0 → the clean sample itself, with zero variance
    mean0, var0 = s.posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(mean0, x0[:1], rtol=1e-12, atol=1e-12)
    assert var0.abs().max().item() < 1e-15


def test_strided_posterior_is_gaussian_conditioning() -> None:
    """q(x_s | x_t, x0) for s < t by conditioning the joint Gaussian of (x_s, x_t) given x0."""
    s = DiscreteSchedule.from_name("cosine")
    gen = torch.Generator().manual_seed(1)
    x0, xt = (torch.randn(4, 5, generator=gen, dtype=torch.float64),
              torch.randn(4, 5, generator=gen, dtype=torch.float64))
    t, t_prev = torch.tensor([999, 700, 300, 40]), torch.tensor([900, 100, 299, 3])
    mean, var = s.posterior_mean_variance(x0, xt, t, t_prev)
    a_t, a_s = s.alphas_cumprod[t].view(-1, 1), s.alphas_cumprod[t_prev].view(-1, 1)
    cov = (a_t / a_s).sqrt() * (1 - a_s)  # Cov(x_s, x_t | x0)
    expect_mean = a_s.sqrt() * x0 + cov / (1 - a_t) * (xt - a_t.sqrt() * x0)
    torch.testing.assert_close(mean, expect_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, (1 - a_s) - cov**2 / (1 - a_t), rtol=1e-9, atol=1e-14)


def test_q_sample_and_lookup_dtype_device_shape() -> None:
    s = DiscreteSchedule.from_name("scaled_linear")
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float32)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 400, 999])
    xt = s.q_sample(x0, t, noise)
    ac = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    assert xt.dtype == torch.float32
    alpha, sigma = s.alpha_sigma(t, like=x0.half())
    assert alpha.dtype == torch.float16 and alpha.shape == (3, 1, 1, 1)
    alpha, sigma = s.alpha_sigma(t.float(), like=x0)  # whole-number floats read the exact table
    torch.testing.assert_close(alpha.view(-1), s.alphas_cumprod[t].sqrt().float(), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.alpha_sigma(torch.tensor([1000]))


def test_t_sigma_log_snr_conversions() -> None:
    s = DiscreteSchedule.from_name("scaled_linear")
    t_int = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(s.sigma_at(t_int), s.sigmas[t_int.long()], rtol=1e-12, atol=0)
    # log-sigma interpolation: halfway is the geometric mean
    assert s.sigma_at(10.5).item() == pytest.approx(math.sqrt(s.sigmas[10].item() * s.sigmas[11].item()), rel=1e-12)
    t = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    torch.testing.assert_close(s.t_at(s.sigma_at(t)), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.t_at_log_snr(s.log_snr_at(t)), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.log_snr_at(t_int), s.log_snr[t_int.long()], rtol=1e-10, atol=1e-12)
    # out-of-range sigmas clamp to the ends
    assert s.t_at(torch.tensor([0.0, 1e9])).tolist() == [0.0, 999.0]
    # fractional VP coefficients agree with sigma and stay on the unit circle
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma / alpha, s.sigma_at(t), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_match_diffusers_ddim(spacing: str) -> None:
    s = DiscreteSchedule.from_name("scaled_linear")
    for steps in (1, 3, 7, 10, 25, 50, 333, 1000):
        ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
        ref.set_timesteps(steps)
        ours = s.timesteps(steps, spacing)
        assert ours.dtype == torch.float64 and ours.tolist() == ref.timesteps.double().tolist(), (spacing, steps)


def test_karras_spacing_is_edm_eq5_in_sigma() -> None:
    s = DiscreteSchedule.from_name("scaled_linear")
    ts = s.timesteps(10, "karras")
    assert ts[0].item() == 999.0 and ts[-1].item() == 0.0 and bool((ts[1:] < ts[:-1]).all())
    lo, hi = s.sigmas[0].item() ** (1 / 7), s.sigmas[-1].item() ** (1 / 7)
    expect = torch.tensor([(hi + i / 9 * (lo - hi)) ** 7 for i in range(10)], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_at(ts), expect, rtol=1e-9, atol=0)


def test_timesteps_bad_input() -> None:
    s = DiscreteSchedule.from_name("linear", num_train_timesteps=100)
    for bad in (0, -1, 101, 2.5, True):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
            s.timesteps(bad)
    with pytest.raises(ValueError, match="unknown timestep spacing 'cosine'.*trailing"):
        s.timesteps(10, "cosine")


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        DiscreteSchedule.from_name("quadratic")
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        DiscreteSchedule.from_name("linear", beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DiscreteSchedule.from_name("linear", prediction_type="score")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DiscreteSchedule.from_name("linear", num_train_timesteps=1)


def test_config_round_trip_json_and_folder(tmp_path) -> None:
    s = DiscreteSchedule.from_name("cosine", num_train_timesteps=64, zero_terminal_snr=True,
                                   prediction_type="v_prediction")
    from ldm.pipeline import load_schedule, save_schedule

    cfg = s.to_config()
    assert cfg["prediction_type"] == "v"
    again = DiscreteSchedule.from_config(cfg)
    assert again.config == s.config
    torch.testing.assert_close(again.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=0)
    loaded = load_schedule(save_schedule(s, tmp_path / "scheduler"))
    assert loaded.config == s.config and (tmp_path / "scheduler" / "config.json").is_file()
    with pytest.raises(ValueError, match="unknown keys"):
        DiscreteSchedule.from_config({**cfg, "beta_schedule": "linear"})
    (tmp_path / "scheduler" / "config.json").write_text('{"beta_schedule": "linear"}')
    with pytest.raises(PartError, match="unknown keys"):
        load_schedule(tmp_path / "scheduler")
    # the linear defaults are written out, so the file alone rebuilds the schedule
    assert DiscreteSchedule.from_name("linear").to_config()["beta_end"] == 0.02
    assert ScheduleConfig().name == "scaled_linear"


def test_diffusers_config_round_trip() -> None:
    s = DiscreteSchedule.from_name("scaled_linear", zero_terminal_snr=True, prediction_type="v")
    dcfg = s.to_diffusers_config()
    assert dcfg["prediction_type"] == "v_prediction" and dcfg["rescale_betas_zero_snr"] is True
    ref = diffusers.DDIMScheduler(**dcfg)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-6)
    back = DiscreteSchedule.from_diffusers_config(dict(ref.config))
    assert back.config == s.config
    with pytest.raises(ValueError, match="beta_schedule 'exp'"):
        DiscreteSchedule.from_diffusers_config({"beta_schedule": "exp"})
