"""Latent consistency distillation: the boundary condition, the skipping-step solver, w-conditioning, one LCD step,
the exported student (full and LCM-LoRA) in the pipeline, and the user errors around them."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_parts import tiny_pipeline, tiny_pipeline_dir

from ldm.conditioning import GUIDANCE_SCALE
from ldm.conditioning import Conditioning as C
from ldm.diffusion.consistency import (
    consistency_function,
    ddim_solver_step,
    default_huber_c,
    pseudo_huber,
    skipping_grid,
    solver_end,
)
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.errors import LdmError, UsageError
from ldm.interop.diffusers_unet import config_from_diffusers, diffusers_config, diffusers_to_ldm
from ldm.lora import apply_to_pipeline
from ldm.models.latent_diffusion import encode_batch
from ldm.models.lcm import LatentConsistencyDistillation
from ldm.modules.denoiser import derive_denoiser
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import TextToImagePipeline

SCHEDULE = DiscreteSchedule.from_name("scaled_linear")
CONFIG = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                    num_heads=2, context_dim=12, num_groups=8)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, input-dependent ε-model (exact arithmetic does not matter, only that both paths agree)."""
    return torch.tanh(0.7 * x + 0.001 * t.view(-1, 1, 1, 1)) * 0.9


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_consistency_function_is_the_identity_at_t_min(prediction_type):
    g = torch.Generator().manual_seed(0)
    x, output = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 0, 19, 999])
    f = consistency_function(output, x, t, SCHEDULE, prediction_type)
    assert torch.equal(f[:2], x[:2])  # f(x, t_min) = x exactly (c_skip = 1, c_out = 0)
    assert not torch.allclose(f[2:], x[2:], atol=1e-2)


def test_the_skipping_step_solver_is_ddim_on_the_grid():
    grid = skipping_grid(1000, 20)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    assert solver_end(grid[:2], 20).tolist() == [0, 19]
    # k = 50 solver steps from T-1 walk the same trajectory as 50 DDIM steps (η = 0) over the trailing grid
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    trajectory = []
    sample_ddim(toy_model, x, SCHEDULE, SCHEDULE.timesteps(50, "trailing"),
                callback=lambda info: trajectory.append(info["x"]))
    ours = x
    for i, start in enumerate(grid.flip(0)[:-1]):
        t = torch.full((2,), int(start))
        ours = ddim_solver_step(toy_model(ours, t.float()), ours, t, solver_end(t, 20), SCHEDULE, "eps")
        torch.testing.assert_close(ours, trajectory[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        skipping_grid(1000, 30)


def test_pseudo_huber_is_the_distance_minus_c():
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(pseudo_huber(b, a, 1.0), torch.tensor([26**0.5 - 1, 0.0]))
    assert default_huber_c((4, 8, 8)) == pytest.approx(0.00054 * 16)


def random_unet(config: UNetConfig) -> UNet:
    torch.manual_seed(0)
    unet = UNet(config).eval()
    with torch.no_grad():  # zero-initialised output layers would make every output 0
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet


def test_guidance_embedding_is_zero_initialised_then_changes_the_output():
    base = random_unet(CONFIG)
    student = derive_denoiser(base, {"guidance_embed_dim": 32}).eval()
    assert student.time_embed.cond_proj.weight.abs().sum() == 0
    g = torch.Generator().manual_seed(1)
    x, t, tokens = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        plain = base(x, t, C(tokens))
        at_1 = student(x, t, C(tokens, extras={GUIDANCE_SCALE: torch.tensor([1.0, 1.0])}))
        at_8 = student(x, t, C(tokens, extras={GUIDANCE_SCALE: torch.tensor([8.0, 8.0])}))
        assert torch.equal(at_1, plain) and torch.equal(at_8, plain)
        student.time_embed.cond_proj.weight.normal_(0, 0.1)
        moved = student(x, t, C(tokens, extras={GUIDANCE_SCALE: torch.tensor([8.0, 8.0])}))
        assert (moved - at_8).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_scale"):
        student(x, t, C(tokens))


def test_guidance_embedding_matches_diffusers_time_cond_proj():
    diffusers = pytest.importorskip("diffusers")
    config = UNetConfig(**{**CONFIG.__dict__, "guidance_embed_dim": 32})
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(config)).eval()
    with torch.no_grad():
        theirs.time_embedding.cond_proj.weight.normal_()
    ours = UNet(config).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), config))
    assert config_from_diffusers(dict(theirs.config)) == config
    scale = torch.tensor([1.5, 4.0, 8.0])  # LCM pipelines embed (scale - 1), LCM's ω
    w_embedding = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scale - 1, 32)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([3.0, 500.0, 999.0])
    tokens = torch.randn(3, 5, 12, generator=g)
    with torch.no_grad():
        expected = theirs(x, t, tokens, timestep_cond=w_embedding).sample
        got = ours(x, t, C(tokens, extras={GUIDANCE_SCALE: scale}))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("teacher"))


def fixed_batch(model: LatentConsistencyDistillation, n: int = 8):
    torch.manual_seed(5)
    batch = {"image": torch.rand(n, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue star"] * (n // 2)}
    z0, cond = encode_batch(batch, model.vae, model.text_encoder, model.teacher, sample=False)
    g = torch.Generator().manual_seed(6)
    index, w = model.draw(n, z0.device, g)
    return z0, cond, index, torch.randn(z0.shape, generator=g), w


@pytest.mark.parametrize("lora", [None, {"rank": 4, "target_modules": ["q", "k", "v", "out", "conv1"]}])
def test_one_distillation_step_decreases_the_loss_on_a_fixed_batch(teacher_dir, lora):
    torch.manual_seed(0)
    model = LatentConsistencyDistillation(str(teacher_dir), lora=lora, guidance_embed_dim=32)
    params = [p for _, p in model.trainable_parameters()]
    names = [n for n, _ in model.trainable_parameters()]
    assert names and (lora is None or all("lora_" in n for n in names))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    batch = fixed_batch(model)
    before = model.lcd_loss(*batch)
    before.backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in params))
    assert norm > 0
    with torch.no_grad():  # a small step along the LCD gradient (then the target network's EMA update)
        for p in params:
            p -= 1e-3 * p.grad / norm
    model.update_target()
    with torch.no_grad():
        after = model.lcd_loss(*batch)
    assert after < before


def test_the_exported_student_samples_in_one_step_without_a_cfg_batch(teacher_dir, tmp_path):
    model = LatentConsistencyDistillation(str(teacher_dir), guidance_embed_dim=32)
    with torch.no_grad():  # a distilled student has a non-zero w embedding
        model.denoiser.time_embed.cond_proj.weight.normal_(0, 0.1)
    model.export(tmp_path / "student")
    config = json.loads((tmp_path / "student" / "pipeline.json").read_text())
    assert config["sampler"] == "lcm" and config["consistency_model"] and config["steps"] == 4
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "student")
    batches = []
    pipe.denoiser.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    images = pipe.generate(["a red circle", "a blue star"], steps=1, guidance=3.0, progress=False)
    assert images.shape == (2, 3, 16, 16) and batches == [2]  # one forward of B: w is an input, no CFG batch
    other = pipe.generate(["a red circle", "a blue star"], steps=1, guidance=6.0, progress=False)
    assert (images - other).abs().max() > 1e-4  # the guidance scale reaches the student


def test_an_lcm_lora_applies_to_its_teacher(teacher_dir, tmp_path):
    model = LatentConsistencyDistillation(str(teacher_dir), lora={"rank": 4})
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.export(tmp_path / "adapter")
    expected = model.pipeline().generate(["a red circle"], steps=2, seed=1, progress=False)
    pipe = TextToImagePipeline.from_pretrained(teacher_dir)
    apply_to_pipeline(pipe, [(str(tmp_path / "adapter"), 1.0)])
    assert (pipe.config.sampler, pipe.config.steps, pipe.config.guidance, pipe.config.consistency_model) == \
        ("lcm", 4, 1.0, True)
    torch.testing.assert_close(pipe.generate(["a red circle"], steps=2, seed=1, progress=False), expected,
                               atol=1e-4, rtol=0)


def test_bad_teachers_and_lcm_sampling_of_a_diffusion_model_are_user_errors(tmp_path):
    with pytest.raises(LdmError, match="teacher.*not a usable pipeline folder"):
        LatentConsistencyDistillation(str(tmp_path))
    (tmp_path / "vae").mkdir()
    with pytest.raises(LdmError, match="teacher.*lacks"):
        LatentConsistencyDistillation(str(tmp_path))
    with pytest.raises(UsageError, match="w_min <= w_max"):
        LatentConsistencyDistillation(str(tmp_path), w_min=5.0, w_max=2.0)
    with pytest.raises(UsageError, match="sampler 'lcm' needs a consistency-distilled model"):
        tiny_pipeline().generate(["a red circle"], sampler="lcm", steps=2, progress=False)


def test_ldm_fit_distils_and_ldm_export_writes_the_student(tmp_path, shapes_dir, teacher_dir):
    from ldm.cli import main as ldm_main
    from ldm.cli.train import CONFIG_ROOT

    cache, run, out = tmp_path / "cache", tmp_path / "lcm", tmp_path / "student"
    assert ldm_main(["cache", "--vae", str(teacher_dir / "vae"), "--text-encoder", str(teacher_dir / "text_encoder"),
                     "--data", str(shapes_dir), "--out", str(cache), "--resolution", "16"]) == 0
    assert ldm_main(["fit", "--config", str(CONFIG_ROOT / "lcm" / "shapes.yaml"), "--model.teacher", str(teacher_dir),
                     "--model.guidance_embed_dim", "32", "--model.val_prompts", '["a red circle"]',
                     "--data.cache_dir", str(cache), "--data.batch_size", "8", "--trainer.default_root_dir", str(run),
                     "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                     "--trainer.limit_val_batches", "1",
                     "--trainer.enable_progress_bar", "false"]) == 0
    assert list((run / "version_0" / "images").glob("val_samples_*.png"))
    assert ldm_main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    assert ldm_main(["generate", "--pipeline", str(out), "--prompt", "a red circle", "--n", "1", "--steps", "1",
                     "--out", str(tmp_path / "grid.png")]) == 0
    assert TextToImagePipeline.from_pretrained(out).config.sampler == "lcm"
