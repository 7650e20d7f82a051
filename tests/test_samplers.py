"""Samplers against the exact Gaussian denoiser (x0 ~ N(μ, s²)), sampler identities, DDIM inversion,
parity with diffusers (DDIM, DPM-Solver++(2M), Euler), dtype/device handling, errors, and
classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.conditioning import Conditioning
from ldm.diffusion.guidance import classifier_free_guidance, guided_output
from ldm.diffusion.objectives import PREDICTION_TYPES, predict_x0_eps, training_target
from ldm.diffusion.samplers import SAMPLERS, ddim_invert, sample, sample_ddim
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.toy import GaussianData

diffusers = pytest.importorskip("diffusers")

SCHEDULE = DiscreteSchedule.from_name("scaled_linear")
DATA = GaussianData([0.5, -1.0], [1.0, 1.5])


def exact_moments(name: str, steps: int, data: GaussianData = DATA, schedule: DiscreteSchedule = SCHEDULE,
                  spacing: str = "trailing", prediction_type: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """Output mean and variance of a deterministic sampler with the exact (affine) Gaussian model, from
    two points: the sampler is an affine map of x_T, and x_T has the exact marginal at t_0."""
    ts = schedule.timesteps(steps, spacing)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(ts[:1]))
    m, s = data.marginal(alpha, sigma)
    out = sample(data.model_fn(schedule, prediction_type), torch.stack([m, m + s]), schedule, steps, sampler=name,
                 spacing=spacing, prediction_type=prediction_type)
    return out[0], (out[1] - out[0]) ** 2


def mc_moments(name: str, steps: int, n: int = 10_000, seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ts = SCHEDULE.timesteps(steps, kw.get("spacing", "trailing"))
    x_T = DATA.sample_marginal(SCHEDULE, ts[0].item(), n, gen)
    model = DATA.consistency_fn(SCHEDULE) if name == "lcm" else DATA.model_fn(SCHEDULE)
    if name == "lcm":  # the exact consistency function is the whole f: no boundary scalings on top
        kw = {**kw, "boundary_condition": False}
    out = sample(model, x_T, SCHEDULE, steps, sampler=name, prediction_type="x0" if name == "lcm" else "eps",
                 generator=gen, **kw)
    return out.mean(0), out.var(0)


def rel_var_err(var: torch.Tensor) -> float:
    return (var / DATA.std**2 - 1).abs().max().item()


def mean_err(mean: torch.Tensor) -> float:
    return ((mean - DATA.mean) / DATA.std).abs().max().item()


# ---- analytic Gaussian checks ------------------------------------------------------------------------
@pytest.mark.parametrize("name,steps,var_tol", [
    ("ddim", 50, 0.07), ("ddim", 1000, 0.005),
    ("dpmpp-2m", 20, 0.05), ("dpmpp-2m", 50, 0.02),
    ("euler", 50, 0.07), ("heun", 20, 0.05), ("heun", 50, 0.02),
])
def test_deterministic_samplers_reproduce_gaussian_moments(name: str, steps: int, var_tol: float) -> None:
    mean, var = exact_moments(name, steps)
    assert mean_err(mean) < 1e-9  # the affine map sends the marginal mean exactly to μ
    assert rel_var_err(var) < var_tol


def test_ddim_variance_equals_closed_form_product() -> None:
    """For Gaussian data each DDIM step multiplies x − α μ by (α_s α s² + σ_s σ)/(α² s² + σ²), so the output
    variance is known exactly (it is below s²: DDIM's discretization shrinks variance)."""
    ts = SCHEDULE.timesteps(25, "trailing")
    a, sg = SCHEDULE.alpha_sigma(ts)
    a, sg = a.tolist() + [1.0], sg.tolist() + [0.0]
    _, var = exact_moments("ddim", 25)
    for d, s in enumerate(DATA.std.tolist()):
        gain = math.prod((a[i + 1] * a[i] * s * s + sg[i + 1] * sg[i]) / (a[i] ** 2 * s * s + sg[i] ** 2)
                         for i in range(25))
        expect = gain**2 * (a[0] ** 2 * s * s + sg[0] ** 2)
        assert var[d].item() == pytest.approx(expect, rel=1e-10)
        assert expect < s * s


def test_deterministic_samplers_converge_with_steps() -> None:
    for name in ("ddim", "dpmpp-2m", "heun"):
        errs = [rel_var_err(exact_moments(name, n)[1]) for n in (10, 50, 250)]
        assert errs[0] > errs[1] > errs[2], (name, errs)


@pytest.mark.parametrize("name,steps,kw,var_tol", [
    ("ddpm", 1000, {}, 0.05),
    ("ddim", 50, {"eta": 1.0}, 0.15),  # ancestral with β̃ under-disperses at 50 steps (≈ -11% here)
    ("lcm", 1, {}, 0.05), ("lcm", 4, {}, 0.05),
])
def test_stochastic_samplers_reproduce_gaussian_moments(name: str, steps: int, kw: dict, var_tol: float) -> None:
    mean, var = mc_moments(name, steps, **kw)
    assert mean_err(mean) < 0.05  # Monte-Carlo sd of the mean is 0.01 at n = 10k
    assert rel_var_err(var) < var_tol


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("kind", ["v", "x0"])
def test_v_and_x0_models_give_the_same_samples_as_eps(name: str, kind: str) -> None:
    x_T = DATA.sample_marginal(SCHEDULE, 999, 64, torch.Generator().manual_seed(1))
    runs = {}
    for k in ("eps", kind):
        runs[k] = sample(DATA.model_fn(SCHEDULE, k), x_T, SCHEDULE, 8, sampler=name, prediction_type=k,
                         generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(runs[kind], runs["eps"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["v", "x0"])
def test_zero_terminal_snr_from_pure_noise(kind: str) -> None:
    """With ᾱ_{T−1} = 0 the marginal at T−1 is N(0, I), so pure noise is the exact start (Lin et al. 2024)."""
    z = DiscreteSchedule.from_name("scaled_linear", zero_terminal_snr=True, prediction_type=kind)
    for name, tol in (("ddim", 0.08), ("dpmpp-2m", 0.02), ("euler", 0.08)):
        x = torch.stack([torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
        out = sample(DATA.model_fn(z, kind), x, z, 50, sampler=name)
        assert ((out[0] - DATA.mean) / DATA.std).abs().max().item() < 1e-3
        assert rel_var_err((out[1] - out[0]) ** 2) < tol
    with pytest.raises(ValueError, match="eps-prediction model cannot recover x0 at zero SNR"):
        sample(DATA.model_fn(z, "eps"), x, z, 10, prediction_type="eps")


def test_lcm_applies_the_consistency_boundary_condition() -> None:
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.full_like(x, 0.25)
    out = sample(lambda x, t: target, x, SCHEDULE, None, sampler="lcm", prediction_type="x0", timesteps=[0.04])
    c_skip, c_out = 0.25 / (0.4**2 + 0.25), 0.4 / math.sqrt(0.4**2 + 0.25)  # LCM: k t = 10 · 0.04
    torch.testing.assert_close(out, c_skip * x + c_out * target, rtol=1e-12, atol=1e-12)
    plain = sample(lambda x, t: target, x, SCHEDULE, None, sampler="lcm", prediction_type="x0", timesteps=[0.04],
                   boundary_condition=False)
    torch.testing.assert_close(plain, target)


# ---- identities between samplers ---------------------------------------------------------------------
def test_euler_equals_ddim_eta0() -> None:
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = DATA.model_fn(SCHEDULE)
    a = sample(model, x_T, SCHEDULE, 12, sampler="euler")
    b = sample(model, x_T, SCHEDULE, 12, sampler="ddim", eta=0.0)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddpm_equals_ddim_eta1_equals_euler_ancestral() -> None:
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = DATA.model_fn(SCHEDULE)
    runs = [sample(model, x_T, SCHEDULE, 12, sampler=name, generator=torch.Generator().manual_seed(5), **kw)
            for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler-a", {}))]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(runs[2], runs[0], rtol=1e-9, atol=1e-9)
    large = sample(model, x_T, SCHEDULE, 12, sampler="ddpm", variance="fixed_large",
                   generator=torch.Generator().manual_seed(5))
    assert (large - runs[0]).abs().max().item() > 1e-3


def test_ddim_inversion_round_trip() -> None:
    x0 = DATA.mean + DATA.std * torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model, ts = DATA.model_fn(SCHEDULE), SCHEDULE.timesteps(50)
    errors = []
    for iters in (0, 1, 3):
        x_T = ddim_invert(model, x0, SCHEDULE, ts, fixed_point_iters=iters)
        back = sample_ddim(model, x_T, SCHEDULE, ts)
        errors.append(((back - x0) / DATA.std).pow(2).mean().sqrt().item())
    assert errors[0] < 0.1 and errors[1] < 0.01 and errors[2] < 1e-4
    assert errors[0] > errors[1] > errors[2]
    # the encoding is a sample of the marginal at t_0: unit-ish variance
    assert x_T.std(0).sub(1).abs().max().item() < 0.15


def test_determinism_and_generators() -> None:
    x_T = torch.randn(8, 3, 2, 2)
    model = lambda x, t: 0.1 * x  # noqa: E731
    for name in SAMPLERS:
        a = sample(model, x_T, SCHEDULE, 5, sampler=name, generator=torch.Generator().manual_seed(0))
        b = sample(model, x_T, SCHEDULE, 5, sampler=name, generator=torch.Generator().manual_seed(0))
        c = sample(model, x_T, SCHEDULE, 5, sampler=name, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b), name
        assert torch.equal(a, c) == (name in ("ddim", "dpmpp-2m", "euler", "heun")), name


# ---- parity with diffusers ------------------------------------------------------------------------------
def _fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for a denoiser."""
    return torch.sin(3 * x) * (t.view(-1, *[1] * (x.ndim - 1)) / 1000) + 0.3 * x


def _diffusers_loop(scheduler, x: torch.Tensor, scale_input: bool = False) -> torch.Tensor:
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if scale_input else x
        x = scheduler.step(_fake_model(inp, t.float().expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_matches_diffusers(kind: str, spacing: str) -> None:
    s = DiscreteSchedule.from_name("scaled_linear", prediction_type=kind)
    ref = diffusers.DDIMScheduler(**s.to_diffusers_config(), timestep_spacing=spacing, clip_sample=False,
                                  set_alpha_to_one=True, steps_offset=0)
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == s.timesteps(10, spacing).long().tolist()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample(_fake_model, x, s, 10, sampler="ddim", spacing=spacing), _diffusers_loop(ref, x),
                               rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_dpmpp_2m_matches_diffusers(kind: str) -> None:
    s = DiscreteSchedule.from_name("scaled_linear", prediction_type=kind)
    ref = diffusers.DPMSolverMultistepScheduler(**s.to_diffusers_config(), timestep_spacing="trailing",
                                                algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == s.timesteps(10, "trailing").long().tolist()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample(_fake_model, x, s, 10, sampler="dpmpp-2m"), _diffusers_loop(ref, x),
                               rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_euler_matches_diffusers(kind: str) -> None:
    s = DiscreteSchedule.from_name("scaled_linear", prediction_type=kind)
    ref = diffusers.EulerDiscreteScheduler(**s.to_diffusers_config(), timestep_spacing="trailing")
    ref.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expect = _diffusers_loop(ref, x * ref.init_noise_sigma, scale_input=True)
    s_max = ref.sigmas[0].item()  # diffusers starts at σ_max·z, ours at the VP sample z·σ_max/√(1+σ_max²)
    torch.testing.assert_close(sample(_fake_model, x * s_max / math.sqrt(1 + s_max**2), s, 10, sampler="euler"),
                               expect, rtol=1e-4, atol=5e-5)


# ---- dtype, device, interface ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_float32_float64_and_device_follow_the_input(name: str) -> None:
    x64 = DATA.sample_marginal(SCHEDULE, 999, 32, torch.Generator().manual_seed(0))
    seen = []

    def model(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return DATA.model_fn(SCHEDULE)(x, t)

    out64 = sample(model, x64, SCHEDULE, 6, sampler=name, generator=torch.Generator().manual_seed(0))
    out32 = sample(model, x64.float(), SCHEDULE, 6, sampler=name, generator=torch.Generator().manual_seed(0))
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    assert seen[0] == (torch.float64, torch.float64, (32,)) and seen[-1] == (torch.float32, torch.float32, (32,))
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    # the meta device has no data: any host read or hard-coded device in the loop would fail here
    meta = sample(lambda x, t: 0.1 * x + t.view(-1, 1) * 0, torch.empty(4, 2, device="meta"), SCHEDULE, 3, sampler=name)
    assert meta.device.type == "meta" and meta.shape == (4, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_samplers_run_on_cuda() -> None:
    x = torch.randn(8, 2, device="cuda")
    for name in SAMPLERS:
        out = sample(DATA.model_fn(SCHEDULE), x, SCHEDULE, 4, sampler=name,
                     generator=torch.Generator("cuda").manual_seed(0))
        assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_callback_and_progress() -> None:
    events = []
    x = torch.randn(4, 2)
    sample(lambda x, t: 0.1 * x, x, SCHEDULE, 5, sampler="dpmpp-2m", callback=events.append, progress=True)
    assert [e["i"] for e in events] == list(range(5)) and events[0]["t"] == 999.0
    assert events[-1]["x"].shape == x.shape and set(events[0]) == {"i", "t", "x", "x0"}


def test_explicit_timesteps_and_spacings() -> None:
    model, x = DATA.model_fn(SCHEDULE), torch.zeros(2, 2, dtype=torch.float64)
    a = sample(model, x, SCHEDULE, None, sampler="ddim", timesteps=[999, 500, 20])
    b = sample(model, x, SCHEDULE, 3, sampler="ddim", timesteps=torch.tensor([999.0, 500.0, 20.0]))
    torch.testing.assert_close(a, b)
    for spacing in ("leading", "linspace", "karras"):
        assert torch.isfinite(sample(model, x, SCHEDULE, 7, sampler="heun", spacing=spacing)).all()


def test_bad_arguments_are_clear_errors() -> None:
    model, x = DATA.model_fn(SCHEDULE), torch.zeros(2, 2)
    with pytest.raises(ValueError,
                       match=r"unknown sampler 'plms'.*'ddpm', 'ddim', 'dpmpp-2m', 'euler', 'euler-a', 'heun', 'lcm'"):
        sample(model, x, SCHEDULE, 10, sampler="plms")
    for steps in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps must be an integer"):
            sample(model, x, SCHEDULE, steps)
    with pytest.raises(ValueError, match="does not take \\['eta'\\]"):
        sample(model, x, SCHEDULE, 10, sampler="dpmpp-2m", eta=0.5)
    with pytest.raises(ValueError, match="unknown DDPM variance"):
        sample(model, x, SCHEDULE, 10, sampler="ddpm", variance="bogus")
    with pytest.raises(ValueError, match="needs a model with 2C output channels"):
        sample(model, x, SCHEDULE, 10, sampler="ddpm", variance="learned")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(model, x, SCHEDULE, None, timesteps=[10, 500])
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        sample(model, x, SCHEDULE, 10, spacing="uniform")
    with pytest.raises(ValueError, match="model_fn returned shape"):
        sample(lambda x, t: x[:, :1], x, SCHEDULE, 3)
    with pytest.raises(ValueError, match="floating-point"):
        sample(model, torch.zeros(2, 2, dtype=torch.long), SCHEDULE, 3)


# ---- classifier-free guidance ----------------------------------------------------------------------------
class _CountingDenoiser:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.masks: list[torch.Tensor | None] = []

    def __call__(self, x, t, cond):
        if torch.is_tensor(cond):
            cond = Conditioning(cond)
        self.batches.append(x.shape[0])
        self.masks.append(cond.mask)
        return torch.tanh(x) * cond.tokens.mean((1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_cfg_scale_one_is_cond_zero_is_uncond_and_one_batched_call() -> None:
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=gen), torch.full((3,), 500.0)
    cond, uncond = torch.randn(3, 7, 8, generator=gen), torch.randn(1, 7, 8, generator=gen)
    den = _CountingDenoiser()
    c, u = den(x, t, cond), den(x, t, uncond.expand(3, -1, -1))
    cond, uncond = Conditioning(cond), Conditioning(uncond)
    den.batches.clear()
    torch.testing.assert_close(classifier_free_guidance(den, cond, uncond, 1.0)(x, t), c)
    torch.testing.assert_close(classifier_free_guidance(den, cond, uncond, 0.0)(x, t), u)
    torch.testing.assert_close(classifier_free_guidance(den, cond, uncond, 7.5)(x, t), u + 7.5 * (c - u))
    assert den.batches == [6, 6, 6]  # cond and uncond evaluated together, once per call


def test_cfg_masks_and_shape_errors() -> None:
    den = _CountingDenoiser()
    x, t = torch.randn(2, 1, 2, 2), torch.zeros(2)
    cond, uncond = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    classifier_free_guidance(den, Conditioning(cond, mask), Conditioning(uncond), 3.0)(x, t)
    assert den.masks[-1].shape == (4, 5) and den.masks[-1][:2].all() and torch.equal(den.masks[-1][2:], mask)
    with pytest.raises(ValueError, match="must share their width D"):
        classifier_free_guidance(den, Conditioning(cond), Conditioning(torch.randn(2, 3, 3)), 3.0)
    with pytest.raises(ValueError, match="conditioning batch 3"):
        classifier_free_guidance(den, Conditioning(cond), Conditioning(torch.randn(3, 5, 4)), 3.0)(x, t)


def test_guidance_rescale_eq_15_16() -> None:
    gen = torch.Generator().manual_seed(1)
    u, c = torch.randn(4, 3, 8, 8, generator=gen), 2 * torch.randn(4, 3, 8, 8, generator=gen)
    plain = guided_output(u, c, 5.0)
    torch.testing.assert_close(guided_output(u, c, 5.0, rescale=0.0), plain)
    full = guided_output(u, c, 5.0, rescale=1.0)
    torch.testing.assert_close(full.flatten(1).std(1), c.flatten(1).std(1))  # std matches the cond output
    torch.testing.assert_close(guided_output(u, c, 5.0, rescale=0.7), 0.7 * full + 0.3 * plain)


def test_cfg_is_the_same_in_eps_and_v_space() -> None:
    """Guidance is linear and the eps→v map is affine with the same x_t term, so guiding either gives one x̂0."""
    gen = torch.Generator().manual_seed(2)
    x, t = (torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64),
            torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64))
    cond, uncond = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64), torch.zeros(1, 4, 6, dtype=torch.float64)
    den = _CountingDenoiser()
    alpha, sigma = SCHEDULE.alpha_sigma(t, like=x)

    def den_v(x, t, ctx):
        eps = den(x, t, ctx)
        x0, _ = predict_x0_eps(eps, x, *SCHEDULE.alpha_sigma(t, like=x), "eps")
        return training_target(x0, eps, *SCHEDULE.alpha_sigma(t, like=x), "v")

    cond, uncond = Conditioning(cond), Conditioning(uncond)
    x0_eps = predict_x0_eps(classifier_free_guidance(den, cond, uncond, 4.0)(x, t), x, alpha, sigma, "eps")[0]
    x0_v = predict_x0_eps(classifier_free_guidance(den_v, cond, uncond, 4.0)(x, t), x, alpha, sigma, "v")[0]
    torch.testing.assert_close(x0_v, x0_eps, rtol=1e-10, atol=1e-10)
