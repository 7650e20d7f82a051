"""Toy problems: the exact Gaussian denoisers, the error table, swiss-roll training and ``ldm toy``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ldm.cli import main
from ldm.diffusion.objectives import training_target
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.toy import GaussianData, error_table_rows, gaussian_error_table, swiss_roll, swiss_roll_log_density
from ldm.evaluation.swiss_roll import sliced_wasserstein, train_toy
from ldm.table import format_table

SCHEDULE = DiscreteSchedule.from_name("scaled_linear")


def test_gaussian_eps_model_is_the_regression_of_eps_on_xt() -> None:
    """E[ε | x_t] is linear in x_t for Gaussian data; least squares on samples recovers its slope/intercept."""
    data = GaussianData([0.7], [0.4])
    gen = torch.Generator().manual_seed(0)
    n, t = 200_000, torch.tensor(300)
    x0 = data.mean + data.std * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    xt = SCHEDULE.q_sample(x0, t.expand(n), eps)
    design = torch.cat([xt, torch.ones_like(xt)], 1)
    coef = torch.linalg.lstsq(design, eps).solution.flatten()
    probe = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    out = data.model_fn(SCHEDULE)(probe, torch.full((2,), 300.0, dtype=torch.float64)).flatten()
    assert out[1] - out[0] == pytest.approx(coef[0].item(), rel=0.02)
    assert out[0].item() == pytest.approx(coef[1].item(), abs=0.01)


def test_gaussian_models_agree_across_prediction_types() -> None:
    data = GaussianData([0.5, -1.0], [1.0, 1.5])
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.0, 10.5, 400.0, 999.0, 250.0], dtype=torch.float64)  # mixed t: per-sample path
    alpha, sigma = SCHEDULE.alpha_sigma(t, like=x)
    eps = data.model_fn(SCHEDULE, "eps")(x, t)
    x0 = data.model_fn(SCHEDULE, "x0")(x, t)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=1e-12, atol=1e-12)  # E is linear
    torch.testing.assert_close(data.model_fn(SCHEDULE, "v")(x, t), training_target(x0, eps, alpha, sigma, "v"))


def test_consistency_function_maps_marginal_to_data() -> None:
    data = GaussianData([0.5], [2.0])
    f = data.consistency_fn(SCHEDULE)
    for t in (0.0, 499.0, 999.0):
        alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        m, s = data.marginal(alpha, sigma)
        out = f(torch.stack([m, m + s]), torch.full((2,), t, dtype=torch.float64))
        assert (out[0].item() == pytest.approx(0.5, abs=1e-12)
                and (out[1] - out[0]).item() == pytest.approx(2.0, rel=1e-12))


def test_error_table_is_exact_for_deterministic_samplers() -> None:
    rows = gaussian_error_table(step_counts=(20, 200), samplers=["ddim", "dpmpp-2m"], n=1000)
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 20), ("ddim", 200),
                                                          ("dpmpp-2m", 20), ("dpmpp-2m", 200)]
    assert all(r["exact"] and abs(r["mean_err"]) < 1e-9 for r in rows)
    ddim20, ddim200, dpm20, dpm200 = (r["var_err"] for r in rows)
    assert -0.2 < ddim20 < ddim200 < 0 and abs(ddim200) < 0.02  # DDIM under-disperses, less with more steps
    assert abs(dpm20) < abs(ddim20) and abs(dpm200) < 0.01
    display = error_table_rows(rows)
    table = format_table(display, [(k, k, "") for k in display[0]], markdown=True)
    assert table.splitlines()[0] == "| sampler | 20 steps | 200 steps |" and "| ddim |" in table


def test_swiss_roll_training_learns() -> None:
    data = swiss_roll(1000, torch.Generator().manual_seed(0))
    assert data.shape == (1000, 2) and 0.5 < data.std().item() < 1.5
    model, losses = train_toy(SCHEDULE, steps=150, batch_size=128, hidden=32)
    assert len(losses) == 150 and sum(losses[-30:]) / 30 < sum(losses[:30]) / 30
    assert sliced_wasserstein(data, data) == 0.0
    assert sliced_wasserstein(data, data + 1.0) > 0.5


def test_ldm_toy_cli_writes_figure_and_metrics(tmp_path, capsys) -> None:
    out = tmp_path / "toy"
    code = main(["toy", "--out", str(out), "--train-steps", "20", "--samplers", "ddim", "heun", "--steps", "2", "4",
                 "--samples", "100", "--langevin-levels", "3", "--langevin-steps", "2", "--pc-steps", "3",
                 "--density-grid", "6", "--ode-steps", "2"])
    assert code == 0
    png = (out / "swiss_roll.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["swd"]) == {"ddim", "heun"} and set(metrics["swd"]["heun"]) == {"2", "4"}
    # the score views: Langevin, VE-PC and the PF-ODE density map (tiny sizes; the real run is in the docs)
    assert (out / "score_views.png").read_bytes()[:4] == b"\x89PNG"
    views = metrics["score_views"]
    assert set(views["swd"]) == {"langevin", "ve-pc"} and views["ode_nfe"] == 8
    assert all(map(math.isfinite, (views["ode_nll_nats"], views["true_nll_nats"])))
    assert main(["toy", "--out", str(out), "--density-grid", "1"]) == 2
    assert "--density-grid" in capsys.readouterr().err
    assert main(["toy", "--out", str(out), "--samplers", "plms"]) == 2
    assert "--samplers: unknown 'plms'" in capsys.readouterr().err


def test_swiss_roll_density_is_normalized_and_peaks_on_the_data() -> None:
    """The quadrature density of the swiss roll's noised marginal integrates to 1 and is highest on samples."""
    axis = torch.linspace(-2.6, 2.6, 105, dtype=torch.float64)  # spacing 0.05, below the kernel widths used
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    cell = (axis[1] - axis[0]).item() ** 2
    for alpha, sigma in ((1.0, 0.1), (0.9, 0.3)):
        mass = swiss_roll_log_density(grid, alpha=alpha, sigma=sigma, nodes=1000).exp().sum().item() * cell
        assert mass == pytest.approx(1.0, abs=0.01)
    data = swiss_roll(200, torch.Generator().manual_seed(0)).double()
    on, off = swiss_roll_log_density(data), swiss_roll_log_density(data + torch.tensor([0.3, 0.0]).double())
    assert (on.mean() - off.mean()).item() > 20
