"""Objectives: eps / v / x0 targets and exact conversions, Min-SNR-γ weights (equal in every
parametrization, finite at zero SNR), the weighted loss, offset noise, consistency scalings."""

from __future__ import annotations

import itertools

import pytest
import torch

from ldm.diffusion.objectives import (
    PREDICTION_TYPES,
    consistency_scalings,
    convert_prediction,
    diffusion_loss,
    loss_weight,
    normalize_prediction_type,
    offset_noise,
    predict_x0_eps,
    training_target,
)
from ldm.diffusion.schedules import DiscreteSchedule


def _pair(seed: int = 0, shape=(4, 3, 5, 5)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64),
            torch.randn(shape, generator=gen, dtype=torch.float64))


def _coefs(t: torch.Tensor, x: torch.Tensor, zero_snr: bool = False):
    return DiscreteSchedule.from_name("scaled_linear", zero_terminal_snr=zero_snr).alpha_sigma(t, like=x)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_target_then_prediction_recovers_x0_and_eps_exactly(kind: str) -> None:
    x0, eps = _pair()
    alpha, sigma = _coefs(torch.tensor([0, 10, 500, 999]), x0)
    xt = alpha * x0 + sigma * eps
    target = training_target(x0, eps, alpha, sigma, kind)
    rx0, reps = predict_x0_eps(target, xt, alpha, sigma, kind)
    torch.testing.assert_close(rx0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reps, eps, rtol=1e-9, atol=1e-9)


def test_v_definition_and_all_conversions() -> None:
    x0, eps = _pair(1)
    alpha, sigma = _coefs(torch.tensor([3, 250, 700, 998]), x0)
    xt = alpha * x0 + sigma * eps
    # Salimans & Ho §4
    torch.testing.assert_close(training_target(x0, eps, alpha, sigma, "v"), alpha * eps - sigma * x0)
    targets = {k: training_target(x0, eps, alpha, sigma, k) for k in PREDICTION_TYPES}
    for src, dst in itertools.product(PREDICTION_TYPES, repeat=2):
        torch.testing.assert_close(convert_prediction(targets[src], xt, alpha, sigma, src, dst), targets[dst],
                                   rtol=1e-9, atol=1e-9)


def test_v_and_x0_are_exact_at_zero_terminal_snr() -> None:
    x0, eps = _pair(2)
    alpha, sigma = _coefs(torch.full((4,), 999), x0, zero_snr=True)
    assert alpha.abs().max().item() == 0.0
    xt = alpha * x0 + sigma * eps  # pure noise
    for kind in ("v", "x0"):
        rx0, reps = predict_x0_eps(training_target(x0, eps, alpha, sigma, kind), xt, alpha, sigma, kind)
        torch.testing.assert_close(rx0, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(reps, eps, rtol=0, atol=1e-12)


def test_prediction_type_aliases_and_errors() -> None:
    assert [normalize_prediction_type(n) for n in ("epsilon", "v_prediction", "sample", "eps", "v", "x0")] == \
        ["eps", "v", "x0", "eps", "v", "x0"]
    with pytest.raises(ValueError, match=r"unknown prediction_type 'score'.*\['eps', 'v', 'x0'\]"):
        normalize_prediction_type("score")


def test_min_snr_weights_closed_form() -> None:
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(snr, "eps", "min_snr", 5.0),
                               torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    torch.testing.assert_close(loss_weight(snr, "v", "min_snr", 5.0),
                               torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51], dtype=torch.float64))
    torch.testing.assert_close(loss_weight(snr, "x0", "min_snr", 5.0),
                               torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64))
    assert loss_weight(snr, "v").tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="unknown loss weighting 'p2'"):
        loss_weight(snr, "eps", "p2")


@pytest.mark.parametrize("zero_snr", [False, True])
def test_min_snr_loss_is_the_same_in_every_parametrization(zero_snr: bool) -> None:
    """For one model error in x0-space, w·‖target − output‖² is min(SNR, γ)‖Δx0‖² whether the model
    is written as eps, v or x0 (Hang et al. 2023 §3.4); finite at SNR = 0."""
    x0, eps = _pair(3, (5, 2, 3, 3))
    t = torch.tensor([0, 100, 400, 800, 999])
    alpha, sigma = _coefs(t, x0, zero_snr)
    xt = alpha * x0 + sigma * eps
    x0_hat = x0 + 0.1 * _pair(4, (5, 2, 3, 3))[0]
    eps_hat = (xt - alpha * x0_hat) / sigma  # the same prediction, expressed as ε
    snr = (alpha**2 / sigma**2).flatten()
    losses = {}
    for kind in PREDICTION_TYPES:
        out = training_target(x0_hat, eps_hat, alpha, sigma, kind)
        tgt = training_target(x0, eps, alpha, sigma, kind)
        losses[kind] = loss_weight(snr, kind, "min_snr", 5.0) * (out - tgt).pow(2).flatten(1).sum(1)
    expect = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).sum(1)
    if zero_snr:  # at SNR = 0 the eps weight is 1 and its error is 0 there: all are 0, none NaN
        assert snr[-1].item() == 0.0
    for kind in PREDICTION_TYPES:
        assert bool(torch.isfinite(losses[kind]).all())
        torch.testing.assert_close(losses[kind], expect, rtol=1e-9, atol=1e-12)


def test_diffusion_loss_matches_manual_computation() -> None:
    s = DiscreteSchedule.from_name("linear", zero_terminal_snr=True)
    x0, noise = _pair(5, (3, 2, 4, 4))
    out = _pair(6, (3, 2, 4, 4))[0]
    t = torch.tensor([0, 500, 999])
    alpha, sigma = s.alpha_sigma(t, like=x0)
    for kind, weighting in itertools.product(PREDICTION_TYPES, ("uniform", "min_snr")):
        loss = diffusion_loss(out, x0, noise, t, s, kind, weighting, gamma=5.0)
        per = (out - training_target(x0, noise, alpha, sigma, kind)).pow(2).mean((1, 2, 3))
        w = loss_weight((alpha**2 / sigma**2).flatten(), kind, weighting, 5.0)
        assert loss.ndim == 0 and torch.isfinite(loss)
        torch.testing.assert_close(loss, (w * per).mean())
    with pytest.raises(ValueError, match="model output shape"):
        diffusion_loss(out[:, :1], x0, noise, t, s)


def test_diffusion_loss_float32_and_gradient() -> None:
    s = DiscreteSchedule.from_name("scaled_linear")
    x0, noise = (v.float() for v in _pair(7, (2, 3, 4, 4)))
    out = torch.zeros_like(x0, requires_grad=True)
    loss = diffusion_loss(out, x0, noise, torch.tensor([5, 900]), s, "eps")
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    torch.testing.assert_close(out.grad, -2 * noise / noise.numel())


def test_offset_noise() -> None:
    x0 = torch.zeros(512, 3, 16, 16)
    plain = offset_noise(x0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    shifted = offset_noise(x0, 0.5, torch.Generator().manual_seed(0))
    channel_means = shifted.mean((2, 3))  # ≈ N(0, 1/256 + 0.5²) per (sample, channel)
    assert channel_means.var().item() == pytest.approx(1 / 256 + 0.25, rel=0.1)
    assert plain.mean((2, 3)).var().item() == pytest.approx(1 / 256, rel=0.1)
    with pytest.raises(ValueError, match="offset noise needs"):
        offset_noise(torch.zeros(4, 2), 0.1)


def test_consistency_scalings_boundary_condition() -> None:
    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 1.0, 999.0]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert (c_skip[1].item() == pytest.approx(0.25 / (100 + 0.25))
            and c_out[1].item() == pytest.approx(10 / (100.25**0.5)))
    assert c_skip[2].item() < 1e-8 and c_out[2].item() == pytest.approx(1.0, abs=1e-8)
