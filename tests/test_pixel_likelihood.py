"""Pixel-space and unconditional models end to end: the identity first stage, the constant conditioner, the digits
builder, learned variance + hybrid loss and VE schedules through LatentDiffusion and the pipeline, and ``ldm nll``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_parts import tiny_pipeline

from ldm.cli import main as ldm_main
from ldm.conditioning import Conditioning
from ldm.diffusion.guidance import classifier_free_guidance, clip_denoised
from ldm.diffusion.likelihood import hybrid_loss
from ldm.diffusion.schedules import DiscreteSchedule, VESchedule, VEScheduleConfig
from ldm.evaluation.likelihood import elbo_bits_per_dim, ode_nll_bits_per_dim
from ldm.io import load_part, save_part
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.identity_vae import IdentityFirstStage, IdentityFirstStageConfig
from ldm.modules.null_text import UnconditionalText, UnconditionalTextConfig
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import PipelineConfig, TextToImagePipeline

PIXEL_UNET = {"type": "unet", "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [2], "num_heads": None, "head_dim": 8, "num_groups": 8, "context_dim": 8}


def gray_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """8-bit gray 8x8 images as the shard loader gives them: three equal channels in [−1, 1]."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 127.5 - 1
    return levels.expand(-1, 3, -1, -1).contiguous()


def pixel_model(**kwargs) -> LatentDiffusion:
    torch.manual_seed(0)
    kwargs.setdefault("denoiser", dict(PIXEL_UNET))
    return LatentDiffusion(pixel_channels=1, unconditional=True, resolution=8,
                           noise_schedule={"name": "cosine"}, lr_schedule={"warmup_steps": 1}, p_uncond=0.0, **kwargs)


def randomize_output(denoiser: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # the zero-initialised conv_out would make every output 0
        denoiser.conv_out.weight.normal_(0, 0.05)
    return denoiser


def test_identity_first_stage_and_constant_conditioner_round_trip(tmp_path) -> None:
    gray = IdentityFirstStage(IdentityFirstStageConfig(z_channels=1))
    x = gray_images(4)
    z = gray.encode_latents(x)
    assert z.shape == (4, 1, 8, 8) and torch.allclose(z[:, 0], x[:, 0], atol=1e-6)  # the mean of 3 equal values
    assert torch.allclose(gray.decode_latents(z), x, atol=1e-6) and gray.encode(x).deterministic
    rgb = IdentityFirstStage()
    assert torch.equal(rgb.encode_latents(x), x) and rgb.config.downsample_factor == 1
    with pytest.raises(ValueError, match="z_channels must be 1"):
        IdentityFirstStageConfig(z_channels=2)
    text = UnconditionalText(UnconditionalTextConfig(token_dim=8, pooled_dim=4))
    cond = text.condition(["a", "b", "c"])
    assert cond.tokens.shape == (3, 1, 8) and cond.pooled.shape == (3, 4) and not cond.tokens.any()
    save_part(gray, tmp_path / "vae")
    save_part(text, tmp_path / "text")
    assert isinstance(load_part(tmp_path / "vae", kind="vae"), IdentityFirstStage)
    assert load_part(tmp_path / "text", kind="text_encoder").token_dim == 8


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits as shards (97 held out), built once for this module."""
    pytest.importorskip("sklearn")
    from ldm.data.digits import build_digits

    out = tmp_path_factory.mktemp("digits") / "digits"
    return out, build_digits(out, val=97, seed=1)


def test_digits_builder_writes_8bit_gray_shards(tmp_path, digits) -> None:
    from ldm.data.registry import DATASETS, benchmark_named
    from ldm.evaluation.fid import load_split

    folder, info = digits
    assert info["counts"] == {"val": 97, "train": 1700} and info["name"] == "digits" and "digits" in DATASETS
    real = load_split(folder, "val", 97, 8)
    assert real.images.shape == (97, 3, 8, 8)
    assert torch.equal(real.images[:, 0], real.images[:, 2])  # gray
    allowed = {round(k * 255 / 16 + 1e-9) if k * 255 % 16 != 8 else k * 255 // 16 + (k * 255 // 16) % 2
               for k in range(17)}  # numpy's rint: halves to even
    assert set(real.images.unique().tolist()) <= allowed and {0, 255} <= set(real.images.unique().tolist())
    assert real.captions[0].startswith("a handwritten digit ") and "label" in real.metas[0]
    assert benchmark_named("digits").val_prompts()[0] == "a handwritten digit 0"
    code = ldm_main(["data", "digits", "--out", str(tmp_path / "cli"), "--val", "10"])
    assert code == 0 and (tmp_path / "cli" / "info.json").is_file()


def test_pixel_model_hybrid_loss_and_its_checks() -> None:
    model = pixel_model(learned_variance=True, loss="hybrid")
    assert model.denoiser.config.out_channels == 2 and model.decoder_kind == "discretized"
    randomize_output(model.denoiser)
    z0, cond = model.latents_and_conditioning({"image": gray_images(), "caption": ["x"] * 8})
    assert z0.shape == (8, 1, 8, 8) and cond.tokens.shape == (8, 1, 8)
    t = torch.tensor([0, 1, 2, 10, 100, 500, 900, 999])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    out = model.denoiser(model.schedule.scale_model_input(model.schedule.q_sample(z0, t, noise), t), t.float(), cond)
    expected = hybrid_loss(out, z0, noise, t, model.schedule, decoder="discretized")
    assert model.loss(z0, cond, t, noise).item() == pytest.approx(expected.item(), rel=1e-6)
    model.loss(z0, cond, t, noise).backward()
    assert model.denoiser.conv_out.weight.grad[1].abs().sum() > 0  # the v channel is trained
    with pytest.raises(ValueError, match="learned_variance: true and loss: hybrid"):
        pixel_model(learned_variance=True)
    with pytest.raises(ValueError, match="learned_variance: true and loss: hybrid"):
        pixel_model(loss="hybrid")
    with pytest.raises(ValueError, match="out_channels"):
        pixel_model(learned_variance=True, loss="hybrid", denoiser={**PIXEL_UNET, "out_channels": 1})
    with pytest.raises(ValueError, match="either vae_path or pixel_channels"):
        pixel_model(vae_path="somewhere")


def test_ve_pixel_model_trains_with_scaled_inputs() -> None:
    """A VE schedule is a schedule: the same loss, the network fed c_in · x_t (Karras et al. 2022, Table 1)."""
    model = pixel_model()
    model.schedule = VESchedule(VEScheduleConfig(sigma_max=20.0))
    randomize_output(model.denoiser)
    seen = []
    model.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[0].std().item()))
    z0, cond = model.latents_and_conditioning({"image": gray_images(), "caption": ["x"] * 8})
    t = torch.full((8,), 999)
    loss = model.loss(z0, cond, t, torch.randn(z0.shape))
    assert torch.isfinite(loss) and seen[-1] < 2.0  # x_t has std ≈ 20; the network sees ≈ 1


def pixel_pipeline(learned: bool, schedule=None) -> TextToImagePipeline:
    torch.manual_seed(0)
    unet = randomize_output(UNet(UNetConfig(in_channels=1, out_channels=2 if learned else 1,
                                            **{k: v for k, v in PIXEL_UNET.items() if k != "type"})))
    return TextToImagePipeline(IdentityFirstStage(IdentityFirstStageConfig(z_channels=1)),
                               UnconditionalText(UnconditionalTextConfig(token_dim=8)), unet,
                               schedule or DiscreteSchedule.from_name("cosine"),
                               PipelineConfig(height=8, width=8, guidance=1.0, sampler="ddpm", steps=5))


def test_pipeline_with_learned_variance_and_ve_round_trips(tmp_path) -> None:
    pipe = pixel_pipeline(True, VESchedule(VEScheduleConfig(sigma_max=20.0, num_train_timesteps=100)))
    images = pipe.generate([""] * 3, steps=4, seed=1, progress=False)
    assert images.shape == (3, 3, 8, 8) and torch.equal(images[:, 0], images[:, 1])
    pipe.save_pretrained(tmp_path / "p")
    again = TextToImagePipeline.from_pretrained(tmp_path / "p")
    assert isinstance(again.schedule, VESchedule) and again.schedule.config.sigma_max == 20.0
    torch.testing.assert_close(again.generate([""] * 3, steps=4, seed=1, progress=False), images)
    for sampler, options in (("langevin", {"n_steps_each": 2}), ("pc", {}), ("euler", {})):
        out = again.generate([""], steps=3, seed=0, sampler=sampler, progress=False, **options)
        assert torch.isfinite(out).all()


def test_guidance_acts_on_the_mean_and_keeps_the_conditional_variance() -> None:
    def denoiser(x, t, cond):  # mean = token value, v = 10 · token value
        value = cond.tokens[:, 0, :1, None, None].expand_as(x)
        return torch.cat([value, 10 * value], 1)

    cond = Conditioning(torch.ones(2, 1, 4))
    uncond = Conditioning(torch.zeros(1, 1, 4))
    out = classifier_free_guidance(denoiser, cond, uncond, 3.0)(torch.zeros(2, 1, 2, 2), torch.zeros(2))
    assert torch.equal(out[:, :1], torch.full((2, 1, 2, 2), 3.0))  # u + 3 (c − u) on the mean part
    assert torch.equal(out[:, 1:], torch.full((2, 1, 2, 2), 10.0))  # the conditional branch's v


def test_nll_of_pixel_pipeline_elbo_and_ode(tmp_path) -> None:
    pipe = pixel_pipeline(True)
    images = ((gray_images(6, seed=2) + 1) * 127.5).round().to(torch.uint8)
    elbo = elbo_bits_per_dim(pipe, images, [""] * 6, timesteps=8, batch_size=3)
    summary = elbo.summary()
    assert summary["n"] == 6 and summary["dims"] == 64 and summary["standard_error"] > 0
    parts = summary["prior_bpd"] + summary["kl_bpd"] + summary["decoder_bpd"]
    assert summary["bits_per_dim"] == pytest.approx(parts, rel=1e-9)
    ode = ode_nll_bits_per_dim(pipe, images, [""] * 6, method="euler", steps=4, probes=2, batch_size=3)
    assert ode.values.shape == (6,) and torch.isfinite(ode.values).all() and ode.info["nfe_mean"] == 4


def test_latent_pipeline_bound_has_a_decoder_term() -> None:
    pipe = tiny_pipeline()
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    result = elbo_bits_per_dim(pipe, images, ["a red circle"] * 4, timesteps=4, batch_size=2)
    s = result.summary()
    assert s["space"] == "latent" and s["pixel_dims"] == 768 and s["latent_dims"] == 64 and s["decoder_std"] > 0
    assert math.isfinite(s["latent_bpd"]) and s["decoder_bpd"] > 0
    with pytest.raises(ValueError, match="latent density"):
        ode_nll_bits_per_dim(pipe, images, [""] * 4)


def test_ldm_nll_cli(tmp_path, capsys, digits) -> None:
    data = digits[0]
    pixel_pipeline(False).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "nll.json"
    code = ldm_main(["nll", "--pipeline", str(tmp_path / "pipe"), "--data", str(data), "--n", "4",
                     "--method", "both", "--timesteps", "5", "--pilot", "1", "--solver", "euler", "--ode-steps", "3",
                     "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0 and [r["method"] for r in rows] == ["elbo", "ode"] and all(r["n"] == 4 for r in rows)
    assert rows[0]["estimator"] == "importance" and rows[0]["timesteps"] == 5
    tiny_pipeline().save_pretrained(tmp_path / "latent")
    capsys.readouterr()
    assert ldm_main(["nll", "--pipeline", str(tmp_path / "latent"), "--data", str(data), "--n", "4",
                     "--method", "ode"]) == 2
    assert "--method ode needs a pixel-space pipeline" in capsys.readouterr().err
    assert ldm_main(["nll", "--pipeline", str(tmp_path / "pipe"), "--data", str(data),
                     "--timesteps", "0"]) == 2
    assert ldm_main(["nll", "--pipeline", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "--pipeline" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_clip_denoised_clips_x0_in_every_parametrization(kind: str) -> None:
    """DDPM's sampler clips x̂0 to [−1, 1] for images; the wrapper does it in the model's own output space and passes
    the learned-variance channels through."""
    from ldm.diffusion.objectives import predict_x0_eps, training_target

    schedule = DiscreteSchedule.from_name("cosine")
    t = torch.tensor([999.0, 500.0, 3.0], dtype=torch.float64)  # ᾱ_999 ≈ 2e-9: float64 to recover x0 from ε
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t, like=x)
    x0 = torch.tensor([5.0, -0.5, -3.0], dtype=torch.float64).view(3, 1, 1, 1).expand_as(x)
    out = training_target(x0, (x - alpha * x0) / sigma, alpha, sigma, kind)
    v = torch.full_like(x, 0.25)
    clipped = clip_denoised(lambda x_, t_: torch.cat([out, v], 1), schedule, kind)(x, t)
    got = predict_x0_eps(clipped[:, :1], x, alpha, sigma, kind)[0]
    torch.testing.assert_close(got, x0.clamp(-1, 1), rtol=1e-8, atol=1e-8)
    assert torch.equal(clipped[:, 1:], v)


def test_likelihood_bench_rows_are_the_evaluations_they_name(tmp_path, digits) -> None:
    """ldm.bench.likelihood (the iDDPM comparison runner) on two tiny digits runs: --skip picks the parts, the
    ELBO row is elbo_bits_per_dim's value, and an FD row is the FD of pipe.generate with that variance and seed."""
    from ldm.bench import likelihood as bench
    from ldm.evaluation.fid import frechet_distance, load_split, to_uint8

    data = digits[0]
    for run, learned in (("simple", False), ("hybrid", True)):
        pixel_pipeline(learned).save_pretrained(tmp_path / "runs" / f"digits-{run}" / "pipeline")
    common = ["--runs", str(tmp_path / "runs"), "--digits", str(data), "--only", "digits", "--n-digits", "4",
              "--timesteps-digits", "3", "--pilot", "0", "--ode-tol", "0.1"]
    assert bench.main([*common, "--skip", "ode", "quality", "--out", str(tmp_path / "elbo.json")]) == 0
    rows = json.loads((tmp_path / "elbo.json").read_text())["digits_nll"]
    assert [(r["loss"], r["method"].split(",")[1].strip()) for r in rows] == [
        ("L_simple", "Σ = fixed_small"), ("L_simple", "Σ = fixed_large"),
        ("L_hybrid", "Σ = learned"), ("L_hybrid", "Σ = fixed_small")]
    hybrid = TextToImagePipeline.from_pretrained(tmp_path / "runs" / "digits-hybrid" / "pipeline")
    real = load_split(data, "val", 4, 8)
    direct = elbo_bits_per_dim(hybrid, real.images, real.captions, timesteps=3, variance="learned", chunk=8)
    assert rows[2]["bpd"] == pytest.approx(direct.summary()["bits_per_dim"], rel=1e-6)
    out = tmp_path / "q.json"
    assert bench.main([*common, "--skip", "nll", "--samples-digits", "6", "--steps", "3", "--seed", "2",
                       "--variants", "L_hybrid, learned Σ", "--out", str(out)]) == 0
    quality = json.loads(out.read_text())["digits_quality"]
    assert "digits_nll" not in json.loads(out.read_text()) and len(quality["rows"]) == 1
    images = hybrid.generate([""] * 6, steps=3, sampler="ddpm", variance="learned", guidance=1.0, seed=2,
                             progress=False)
    train = bench.pixel_features(load_split(data, "train", 1500, 8).images, gray=True)
    fd = frechet_distance(train, bench.pixel_features(to_uint8(images), gray=True))
    assert quality["rows"][0]["fd"] == pytest.approx(fd, rel=1e-9) and quality["rows"][0]["seed"] == 2
