"""The DiT denoiser: patchify, adaLN-Zero at initialisation, masked cross-attention, the paper's parameter counts
and Gflops, config and size errors, export round trip, and training through LatentDiffusion / `ldm fit` into the
unchanged pipeline (tiny seeded models)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_parts import export_tiny_parts, tiny_text_encoder, tiny_vae
from torch import nn

from ldm.conditioning import Conditioning as C
from ldm.io import ConfigError, PartError, load_part, save_part
from ldm.modules.dit import DiT, DiTConfig, patchify, unpatchify
from ldm.modules.embeddings import spatial_position_embedding
from ldm.pipeline import PipelineConfig, TextToImagePipeline

TINY = DiTConfig(in_channels=4, out_channels=4, context_dim=6, input_size=8, patch_size=2, hidden_size=16,
                 depth=2, num_heads=2)
TINY_SPEC = {"type": "dit", "hidden_size": 16, "depth": 2, "num_heads": 2, "patch_size": 2}


def tiny_dit(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A seeded DiT whose zero-initialised layers (modulations, output, cross-attention out) are randomised."""
    torch.manual_seed(seed)
    dit = DiT(config)
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.3)
    return dit


def inputs(config: DiTConfig = TINY, batch: int = 2, tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = config.input_size
    return (torch.randn(batch, config.in_channels, size, size, generator=g), torch.rand(batch, generator=g) * 999,
            torch.randn(batch, tokens, config.context_dim, generator=g))


# ---- patchify -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,p", [((2, 4, 8, 8), 2), ((1, 3, 6, 9), 3), ((2, 8, 4, 4), 1), ((1, 2, 8, 4), 4)])
def test_patchify_and_unpatchify_are_exact_inverses(shape, p):
    x = torch.randn(shape)
    tokens = patchify(x, p)
    assert tokens.shape == (shape[0], (shape[2] // p) * (shape[3] // p), p * p * shape[1])
    assert torch.equal(unpatchify(tokens, p, shape[2], shape[3]), x)
    t = torch.randn(tokens.shape)
    assert torch.equal(patchify(unpatchify(t, p, shape[2], shape[3]), p), t)


def test_patch_layout_and_embedding_is_vits_strided_convolution():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    tokens = patchify(x, 2)
    # token 1 = rows 0-1, columns 2-3, flattened as (row, column, channel)
    assert tokens[0, 1].tolist() == [2, 26, 3, 27, 8, 32, 9, 33]
    assert tokens.shape == (1, 6, 8)
    # a linear map of the flattened patches = a p x p convolution with stride p (ViT eq. 1)
    linear = nn.Linear(8, 5)
    conv = nn.Conv2d(2, 5, 2, stride=2)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.view(5, 2, 2, 2).permute(0, 3, 1, 2))
        conv.bias.copy_(linear.bias)
    torch.testing.assert_close(linear(tokens), conv(x).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="3x3 patches"):
        patchify(x, 3)


# ---- adaLN-Zero ---------------------------------------------------------------------------------------
def test_adaln_zero_blocks_are_the_identity_at_initialisation():
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, pooled_dim=3)
    dit = DiT(config)
    x, t, ctx = inputs(config)
    h, c = torch.randn(2, 16, 16), torch.randn(2, 16)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])[:, None, None, :]
    for block in dit.blocks:
        assert torch.equal(block(h, c, ctx, mask), h)
    cond = C(ctx, pooled=torch.randn(2, 3))
    assert torch.equal(dit(x, t, cond), torch.zeros_like(x))  # zero output layer: eps = 0 at the start
    # the same blocks with their modulation drawn are not (the test can fail)
    torch.nn.init.normal_(dit.blocks[0].modulation.weight)
    assert not torch.allclose(dit.blocks[0](h, c, ctx, mask), h)


def test_the_first_step_trains_only_the_zero_layers_and_gates():
    """adaLN-Zero: at initialisation only the output layer's gradient is non-zero (DiT sec. 3.2)."""
    torch.manual_seed(0)
    dit = DiT(TINY)
    x, t, ctx = inputs()
    (dit(x, t, C(ctx)) - x).square().mean().backward()
    moved = {n for n, p in dit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"final.linear.weight", "final.linear.bias"}


# ---- conditioning ---------------------------------------------------------------------------------------
def test_cross_attention_ignores_padding_tokens():
    dit = tiny_dit().eval()
    x, t, ctx = inputs(tokens=6)
    keep = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    with torch.no_grad():
        masked = dit(x, t, C(ctx, keep))
        padded = ctx.clone()
        padded[0, 3:] = 50 * torch.randn(3, TINY.context_dim)
        torch.testing.assert_close(dit(x, t, C(padded, keep)), masked, atol=0, rtol=0)
        torch.testing.assert_close(dit(x[:1], t[:1], C(ctx[:1, :3])), masked[:1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dit(x, t, C(padded)), masked)  # unmasked padding changes the output
        real = ctx.clone()
        real[0, 1] += 1.0
        assert not torch.allclose(dit(x, t, C(real, keep))[0], masked[0])  # a real token does


def test_pooled_text_and_class_labels_join_the_conditioning_vector():
    config = dataclasses.replace(TINY, pooled_dim=3, num_classes=5)
    dit = tiny_dit(config).eval()
    x, t, ctx = inputs(config)
    pooled, labels = torch.randn(2, 3), torch.tensor([1, 5])  # 5 = the null class
    with torch.no_grad():
        out = dit(x, t, C(ctx, pooled=pooled, extras={"label": labels}))
        assert not torch.allclose(out, dit(x, t, C(ctx, pooled=pooled.flip(0), extras={"label": labels})))
        assert not torch.allclose(out[0], dit(x, t, C(ctx, pooled=pooled, extras={"label": labels.flip(0)}))[0])
        one = dit(x[:1], t[:1], C(ctx[:1], pooled=pooled[:1], extras={"label": labels[:1]}))
        torch.testing.assert_close(one, out[:1], atol=1e-5, rtol=1e-5)
    assert dit.label_embed.num_embeddings == 6
    with pytest.raises(ValueError, match=r"extras\['label'\]"):
        dit(x, t, C(ctx, pooled=pooled))
    with pytest.raises(ValueError, match="cond.pooled must be"):
        dit(x, t, C(ctx, extras={"label": labels}))


def test_without_cross_attention_the_tokens_are_ignored():
    config = dataclasses.replace(TINY, cross_attention=False)
    dit = tiny_dit(config).eval()
    assert all(b.cross_attn is None for b in dit.blocks)
    x, t, ctx = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, C(ctx)), dit(x, t, C(torch.randn_like(ctx))), atol=0, rtol=0)


def test_position_embeddings_sincos_fixed_or_learned():
    dit = DiT(TINY)
    expected = spatial_position_embedding(4, 4, 16).flatten(1).T  # token k = row k // 4, column k % 4
    torch.testing.assert_close(dit.pos_embed[0], expected)
    assert "pos_embed" not in dit.state_dict() and "pos_embed" not in dict(dit.named_parameters())
    learned = DiT(dataclasses.replace(TINY, position_embedding="learned"))
    assert learned.pos_embed.shape == (1, 16, 16) and learned.pos_embed.requires_grad
    assert "pos_embed" in learned.state_dict()


# ---- the paper's presets ---------------------------------------------------------------------------------
def count(config: DiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(config).parameters())


@pytest.mark.parametrize("name,paper_millions", [("DiT-XL/2", 675), ("DiT-S/2", 33), ("DiT-B/4", 130),
                                                 ("DiT-L/8", 458)])
def test_paper_parameter_counts(name, paper_millions):
    """DiT Table 4's model sizes for the class-conditional ImageNet-256 models, within 1 %."""
    assert count(DiTConfig.paper(name)) == pytest.approx(paper_millions * 1e6, rel=0.01)


def test_presets_and_paper_gflops():
    """Forward Gflops as the paper counts them (multiply-adds; Table 4: S/2 6.06, B/4 5.56, S/8 0.36)."""
    from ldm.bench.dit import forward_gflops

    xl = DiTConfig.preset("DiT-XL/2")
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size, xl.mlp_ratio) == (28, 1152, 16, 2, 4.0)
    b8 = DiTConfig.preset("DiT-B/8", input_size=64, context_dim=77)
    assert (b8.depth, b8.hidden_size, b8.num_heads, b8.patch_size, b8.input_size) == (12, 768, 12, 8, 64)
    for name, gflops in [("DiT-S/2", 6.06), ("DiT-B/4", 5.56), ("DiT-S/8", 0.36)]:
        with torch.device("meta"):
            dit = DiT(DiTConfig.paper(name))
        assert forward_gflops(dit) == pytest.approx(gflops, abs=0.006)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig.preset("DiT-M/2")


# ---- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,match", [
    (dict(input_size=9), "not divisible by patch_size"),
    (dict(num_heads=3), "num_heads=3"),
    (dict(out_channels=6), "out_channels=6"),
    (dict(position_embedding="rope"), "position_embedding"),
    (dict(num_classes=0), "num_classes"),
    (dict(guidance_embed_dim=2), "guidance_embed_dim"),
])
def test_bad_config_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


def test_bad_inputs_are_clear_errors():
    dit = tiny_dit()
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match=r"latents are 16x16 but this DiT is built for 8x8"):
        dit(torch.randn(2, 4, 16, 16), t, C(ctx))
    with pytest.raises(ValueError, match="DiT: x must be"):
        dit(torch.randn(2, 3, 8, 8), t, C(ctx))
    with pytest.raises(ValueError, match="context_dim=6"):
        dit(x, t, C(torch.randn(2, 5, 7)))
    with pytest.raises(ValueError, match="masks every token"):
        dit(x, t, C(ctx, torch.tensor([[True] * 5, [False] * 5])))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return export_tiny_parts(tmp_path_factory.mktemp("parts"))


def latent_diffusion(parts, denoiser, resolution=16, **kwargs):
    from ldm.models.latent_diffusion import LatentDiffusion

    torch.manual_seed(0)
    return LatentDiffusion(vae_path=str(parts[0]), text_encoder_path=str(parts[1]), denoiser=denoiser,
                           resolution=resolution, lr_schedule={"warmup_steps": 1}, **kwargs)


def test_latent_diffusion_fills_the_size_and_refuses_mismatches(parts):
    model = latent_diffusion(parts, TINY_SPEC, resolution=32)  # tiny vae: factor 4
    cfg = model.denoiser.config
    assert isinstance(model.denoiser, DiT)
    assert (cfg.input_size, cfg.in_channels, cfg.out_channels, cfg.context_dim) == (8, 4, 4, 32)
    with pytest.raises(ConfigError, match=r"built for 4x4 latents \(input_size\) but gets 8x8"):
        latent_diffusion(parts, {**TINY_SPEC, "input_size": 4}, resolution=32)
    with pytest.raises(ConfigError, match="reads 3-channel latents but the vae makes 4"):
        latent_diffusion(parts, {**TINY_SPEC, "in_channels": 3, "out_channels": 3})
    with pytest.raises(ConfigError, match="input_size=6 is not divisible by patch_size=4"):
        latent_diffusion(parts, {**TINY_SPEC, "patch_size": 4}, resolution=24)
    with pytest.raises(ConfigError, match="learned-variance"):
        latent_diffusion(parts, {**TINY_SPEC, "out_channels": 8})
    with pytest.raises(ConfigError, match="resolution=18 is not a multiple of the vae factor 4"):
        latent_diffusion(parts, TINY_SPEC, resolution=18)


def test_pipeline_refuses_a_dit_of_another_size():
    dit = DiT(DiTConfig(context_dim=32, input_size=8, hidden_size=16, depth=1, num_heads=2))
    with pytest.raises(PartError, match=r"built for 8x8 latents \(input_size\) but gets 4x4"):
        TextToImagePipeline(tiny_vae(), tiny_text_encoder(), dit, _schedule(), PipelineConfig(height=16, width=16))
    pipe = TextToImagePipeline(tiny_vae(), tiny_text_encoder(), dit, _schedule(), PipelineConfig(height=32, width=32))
    with pytest.raises(ValueError, match=r"64x64 does not fit the denoiser: it is built for 8x8"):
        pipe.generate(["a red circle"], steps=1, height=64, width=64, progress=False)


def _schedule():
    from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig

    return DiscreteSchedule(ScheduleConfig(name="scaled_linear"))


# ---- files -------------------------------------------------------------------------------------------
def test_export_round_trip(tmp_path):
    dit = tiny_dit(dataclasses.replace(TINY, position_embedding="learned", pooled_dim=3))
    save_part(dit, tmp_path / "dit")
    assert json.loads((tmp_path / "dit" / "config.json").read_text())["_class_name"] == "DiT"
    loaded = load_part(tmp_path / "dit", kind="denoiser")
    assert isinstance(loaded, DiT) and loaded.config == dit.config
    x, t, ctx = inputs()
    cond = C(ctx, pooled=torch.randn(2, 3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), dit.eval()(x, t, cond), atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = tiny_dit(), tiny_dit(dataclasses.replace(TINY, gradient_checkpointing=True))
    x, t, ctx = inputs()
    grads = []
    for dit in (plain, ckpt):
        dit(x, t, C(ctx)).square().mean().backward()
        grads.append([p.grad.clone() for p in dit.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_few_steps_learn_a_fixed_batch_and_the_checkpoint_reloads(parts):
    model = latent_diffusion(parts, TINY_SPEC, p_uncond=0.0, pooled_conditioning=True)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1,
             "caption": [f"a {c} circle" for c in ["red", "blue", "green", "pink"] * 2]}
    z0, cond = model.latents_and_conditioning(batch, sample=False)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(z0.shape, generator=g)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    first = model.loss(z0, cond, t, noise).item()
    for _ in range(25):
        opt.zero_grad()
        model.loss(z0, cond, t, noise).backward()
        opt.step()
    assert model.loss(z0, cond, t, noise).item() < 0.6 * first
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    other = latent_diffusion(parts, TINY_SPEC, p_uncond=0.0, pooled_conditioning=True)
    other.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(other.loss(z0, cond, t, noise), model.loss(z0, cond, t, noise), atol=0, rtol=0)


def test_fit_export_and_generate_through_the_cli(tmp_path, shapes_dir):
    """The U-Net's own path, config switched: cache -> `ldm fit` -> `ldm export` -> pipeline -> `ldm generate`."""
    from ldm.cli import main as ldm_main

    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    cache, run, pipe_dir = tmp_path / "cache", tmp_path / "ldm", tmp_path / "pipeline"
    assert ldm_main(["cache", "--vae", str(vae_dir), "--text-encoder", str(te_dir), "--data", str(shapes_dir),
                     "--out", str(cache), "--splits", "train,val", "--max-samples", "64"]) == 0
    assert ldm_main(["fit", "--model", "ldm.models.latent_diffusion.LatentDiffusion",
                     "--model.vae_path", str(vae_dir), "--model.text_encoder_path", str(te_dir),
                     "--model.denoiser", json.dumps(TINY_SPEC), "--model.pooled_conditioning", "true",
                     "--model.resolution", "32", "--model.sample_every_n_val", "0",
                     "--data", "ldm.data.latents.LatentDataModule", "--data.cache_dir", str(cache),
                     "--data.batch_size", "16", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "3",
                     "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                     "--trainer.enable_progress_bar", "false"]) == 0
    assert ldm_main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(pipe_dir)]) == 0
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    assert isinstance(pipe.denoiser, DiT) and pipe.denoiser.config.input_size == 8
    assert pipe.denoiser.config.pooled_dim == 32
    images = pipe.generate(["a red circle", "a blue star"], steps=2, guidance=3.0, progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    out = tmp_path / "grid.png"
    assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--prompt", "a red circle", "--n", "2",
                     "--steps", "2", "--sampler", "ddim", "--out", str(out)]) == 0
    assert out.is_file()


def test_shipped_configs_build():
    """shapes-dit.yaml matches the shapes U-Net's parameter count (within 2 %) with the demo's text widths;
    sd-dit.yaml is DiT-XL/2 on 64x64x4 latents (resolution 512 / factor 8)."""
    import yaml

    from ldm.cli.train import CONFIG_ROOT
    from ldm.modules.denoiser import build_denoiser
    from ldm.modules.unet import UNet

    def spec(name):
        return yaml.safe_load((CONFIG_ROOT / "ldm" / name).read_text())["model"]["init_args"]

    widths = {"in_channels": 4, "out_channels": 4, "context_dim": 64, "pooled_dim": 128, "input_size": 8}
    dit = build_denoiser(spec("shapes-dit.yaml")["denoiser"], widths)
    unet = build_denoiser(spec("shapes.yaml")["denoiser"], widths)
    n_dit, n_unet = (sum(p.numel() for p in m.parameters()) for m in (dit, unet))
    assert isinstance(dit, DiT) and isinstance(unet, UNet) and n_dit == pytest.approx(n_unet, rel=0.02)
    assert dit.config == DiTConfig.preset("DiT-shapes/2", **widths)
    sd = spec("sd-dit.yaml")
    with torch.device("meta"):
        xl = build_denoiser(sd["denoiser"], {**widths, "context_dim": 768, "pooled_dim": None,
                                             "input_size": sd["resolution"] // 8})
    assert xl.config.input_size == 64 and xl.config.grid_size == 32 and xl.config.gradient_checkpointing
    assert dataclasses.replace(xl.config, gradient_checkpointing=False) == DiTConfig.preset(
        "DiT-XL/2", input_size=64, context_dim=768)


# ---- LoRA and LCM on a DiT ------------------------------------------------------------------------------
TINY_PIPE = DiTConfig(context_dim=32, input_size=4, patch_size=2, hidden_size=16, depth=2, num_heads=2)


def tiny_dit_pipeline_dir(root, seed: int = 0):
    """A 16x16 pipeline (tiny VAE, factor 4) whose denoiser is a seeded 2-block DiT."""
    pipe = TextToImagePipeline(tiny_vae(seed), tiny_text_encoder(seed), tiny_dit(TINY_PIPE, seed), _schedule(),
                               PipelineConfig(height=16, width=16))
    pipe.save_pretrained(root)
    return root


def _random_lora_b(module: nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_adapts_every_dit_attention_and_fine_tunes_through_latent_diffusion(tmp_path):
    """The default targets (q, k, v, out) reach the self- and cross-attention of every block; only the adapters
    train; the adapter folder applies through `ldm lora merge` and `ldm generate --lora` as the U-Net's does."""
    from ldm.cli import main as ldm_main
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.modules.lora import lora_layers

    pipe_dir = tiny_dit_pipeline_dir(tmp_path / "pipe")
    model = LatentDiffusion(init_from=str(pipe_dir), lora={"rank": 2})
    assert set(lora_layers(model.denoiser)) == {f"blocks.{i}.{a}.{p}" for i in range(2)
                                                for a in ("attn", "cross_attn") for p in ("q", "k", "v", "out")}
    names = [n for n, _ in model.trainable_parameters()]
    assert len(names) == 2 * 2 * 4 * 2 and all("lora_" in n for n in names)
    base = TextToImagePipeline.from_pretrained(pipe_dir)
    x, t, ctx = inputs(TINY_PIPE)
    with torch.no_grad():  # B = 0: the adapted DiT computes what the base computes
        torch.testing.assert_close(model.denoiser(x, t, C(ctx)), base.denoiser(x, t, C(ctx)), atol=1e-6, rtol=0)
    _random_lora_b(model.denoiser)
    with torch.no_grad():
        for shadow, (_, p) in zip(model.ema.shadow, model.trainable_parameters()):
            shadow.copy_(p)
    model.export(tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (record["denoiser_class"], record["key_layout"]) == ("DiT", "ldm")
    expected = model.pipeline().generate(["a red circle"], steps=2, seed=3, progress=False)
    assert (base.generate(["a red circle"], steps=2, seed=3, progress=False) - expected).abs().max() > 1e-3
    merged = tmp_path / "merged"
    assert ldm_main(["lora", "merge", "--pipeline", str(pipe_dir), "--lora", str(tmp_path / "adapter"),
                     "--out", str(merged)]) == 0
    got = TextToImagePipeline.from_pretrained(merged).generate(["a red circle"], steps=2, seed=3, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                     "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "grid.png")]) == 0


def test_guidance_embedding_of_a_dit_starts_at_zero_and_reaches_the_output():
    """w-conditioning (LCM's student input): zero-initialised, so the derived DiT equals its teacher at first."""
    from ldm.conditioning import GUIDANCE_SCALE
    from ldm.modules.denoiser import derive_denoiser

    teacher = tiny_dit()
    student = derive_denoiser(teacher, {"guidance_embed_dim": 8})
    x, t, ctx = inputs()
    w = {GUIDANCE_SCALE: torch.tensor([2.0, 7.5])}
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, C(ctx, extras=w)), teacher(x, t, C(ctx)), atol=0, rtol=0)
        student.time_embed.cond_proj.weight.normal_(0, 0.5)
        assert (student(x, t, C(ctx, extras=w)) - teacher(x, t, C(ctx))).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"DiT: this DiT is conditioned on the guidance scale"):
        student(x, t, C(ctx))
    assert DiT(dataclasses.replace(TINY, guidance_embed_dim=8)).time_embed.cond_proj.weight.abs().sum() == 0


@pytest.mark.parametrize("lora", [None, {"rank": 2}])
def test_latent_consistency_distillation_of_a_dit(tmp_path, lora):
    """One LCD step on a fixed batch lowers the loss for the full (w-conditioned) student and for an LCM-LoRA; the
    full student samples in one forward of B (no CFG batch), the LCM-LoRA applies to its DiT teacher."""
    from ldm.lora import apply_to_pipeline
    from ldm.models.latent_diffusion import encode_batch
    from ldm.models.lcm import LatentConsistencyDistillation

    teacher = tiny_dit_pipeline_dir(tmp_path / "teacher")
    torch.manual_seed(0)
    model = LatentConsistencyDistillation(str(teacher), lora=lora, guidance_embed_dim=16)
    assert isinstance(model.denoiser, DiT)
    params = [p for _, p in model.trainable_parameters()]
    batch = {"image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1,
             "caption": ["a red circle", "a blue star"] * 2}
    z0, cond = encode_batch(batch, model.vae, model.text_encoder, model.teacher, sample=False)
    g = torch.Generator().manual_seed(6)
    index, w = model.draw(4, z0.device, g)
    args = (z0, cond, index, torch.randn(z0.shape, generator=g), w)
    before = model.lcd_loss(*args)
    before.backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in params if p.grad is not None))
    assert norm > 0
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 1e-3 * p.grad / norm
        model.update_target()
        assert model.lcd_loss(*args) < before
        if lora is None:
            model.denoiser.time_embed.cond_proj.weight.normal_(0, 0.1)
        else:
            _random_lora_b(model.denoiser)
    model.export(tmp_path / "student")
    if lora is None:
        pipe = TextToImagePipeline.from_pretrained(tmp_path / "student")
        assert isinstance(pipe.denoiser, DiT) and pipe.config.sampler == "lcm"
        batches = []
        pipe.denoiser.register_forward_hook(lambda module, a, out: batches.append(a[0].shape[0]))
        images = pipe.generate(["a red circle", "a blue star"], steps=1, guidance=3.0, progress=False)
        assert images.shape == (2, 3, 16, 16) and batches == [2]
        other = pipe.generate(["a red circle", "a blue star"], steps=1, guidance=6.0, progress=False)
        assert (images - other).abs().max() > 1e-4
    else:
        expected = model.pipeline().generate(["a red circle"], steps=2, seed=1, progress=False)
        pipe = TextToImagePipeline.from_pretrained(teacher)
        apply_to_pipeline(pipe, [(str(tmp_path / "student"), 1.0)])
        assert pipe.config.sampler == "lcm"
        torch.testing.assert_close(pipe.generate(["a red circle"], steps=2, seed=1, progress=False), expected,
                                   atol=1e-4, rtol=0)


def test_size_conditioning_with_a_dit_is_refused(parts):
    """SDXL size/crop micro-conditioning lives in the U-Net's extra_conditions; a DiT would silently drop it."""
    with pytest.raises(ConfigError, match="size_conditioning: the DiT denoiser takes no size/crop conditions"):
        latent_diffusion(parts, TINY_SPEC, size_conditioning=True)
