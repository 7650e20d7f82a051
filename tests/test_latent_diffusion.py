"""LatentDiffusion: learning on a fixed batch, CFG caption dropout, checkpoints without frozen parts, export."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_parts import TINY_UNET, export_tiny_parts

from ldm.conditioning import Conditioning, drop_for_guidance
from ldm.errors import UsageError
from ldm.io import PartError
from ldm.models.latent_diffusion import LatentDiffusion, sample_timesteps
from ldm.pipeline import TextToImagePipeline


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return export_tiny_parts(tmp_path_factory.mktemp("parts"))


def make_model(parts, **kwargs):
    vae_dir, te_dir = parts
    torch.manual_seed(0)
    return LatentDiffusion(vae_path=str(vae_dir), text_encoder_path=str(te_dir), denoiser=dict(TINY_UNET),
                           resolution=16, lr_schedule={"warmup_steps": 1}, **kwargs)


def image_batch(n=8):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
            "caption": [f"a {c} circle on the left" for c in ["red", "blue", "green", "pink"] * (n // 4)]}


def test_missing_parts_say_which_training_to_run(tmp_path, parts):
    with pytest.raises(PartError, match="make train-vae"):
        LatentDiffusion(vae_path=str(tmp_path / "nope"), text_encoder_path=str(parts[1]))
    with pytest.raises(PartError, match="make train-clip"):
        LatentDiffusion(vae_path=str(parts[0]), text_encoder_path=None)


def test_unet_takes_its_geometry_from_the_parts(parts):
    model = make_model(parts)
    assert model.denoiser.config.in_channels == 4 and model.denoiser.config.context_dim == 32
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(parts):
    model = make_model(parts, p_uncond=0.0, optimizer={"lr": 3e-3})
    batch = image_batch()
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    z0, cond = model.latents_and_conditioning(batch, sample=False)  # fixed latents: the posterior mode
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(z0.shape, generator=g)

    def loss():
        return model.loss(z0, cond, t, noise)

    first = loss().item()
    for _ in range(25):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.5 * first


def test_caption_dropout_rate_and_replacement(parts):
    model = make_model(parts)
    _, cond = model.latents_and_conditioning(image_batch(8))
    cond = Conditioning.cat([cond] * 250)
    torch.manual_seed(0)
    dropped = drop_for_guidance(cond, model.empty_conditioning(), 0.1)
    empty = model.empty_conditioning().pad_to(cond.length)
    is_empty = (dropped.tokens == empty.tokens).flatten(1).all(1) & (dropped.mask == empty.mask).all(1)
    assert 0.08 < is_empty.float().mean().item() < 0.12
    kept = ~is_empty
    assert torch.equal(dropped.tokens[kept], cond.tokens[kept])
    assert drop_for_guidance(cond, model.empty_conditioning(), 0.0) is cond


def test_stratified_timesteps_cover_every_stratum():
    torch.manual_seed(0)
    t = sample_timesteps(10, 1000, stratified=True, device=torch.device("cpu"))
    assert sorted((t // 100).tolist()) == list(range(10))
    assert t.min() >= 0 and t.max() <= 999


def test_logit_normal_timesteps_follow_the_sd3_density():
    # P(t < k) = P(sigmoid(m + s n) < k / T) = Phi((logit(k / T) - m) / s); stratified u makes the sample quantiles
    # within a stratum (1 / batch) of the exact ones
    torch.manual_seed(0)
    mean, std, batch = 0.5, 1.0, 20000
    t = sample_timesteps(batch, 1000, stratified=True, device=torch.device("cpu"), logit_normal=(mean, std))
    for k in (100, 300, 500, 700, 900):
        expected = 0.5 * (1 + math.erf((math.log(k / (1000 - k)) - mean) / (std * math.sqrt(2))))
        assert abs((t < k).float().mean().item() - expected) < 2e-3
    assert t.min() >= 0 and t.max() <= 999
    uniform = sample_timesteps(batch, 1000, stratified=True, device=torch.device("cpu"))
    assert (t >= 500).float().mean() > 0.65 > (uniform >= 500).float().mean()  # m = 0.5 trains noisier steps more


def test_logit_normal_needs_l_simple(parts):
    with pytest.raises(UsageError, match="timestep_sampling"):
        make_model(parts, timestep_sampling="cosine")
    with pytest.raises(UsageError, match="logit_normal needs loss: simple"):
        make_model(parts, timestep_sampling="logit_normal", learned_variance=True, loss="hybrid")


def test_checkpoint_excludes_frozen_parts_and_reloads(parts):
    model = make_model(parts)
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith(("vae.", "text_encoder.")) for k in ckpt["state_dict"])
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    other = make_model(parts)
    with torch.no_grad():
        for p in other.denoiser.parameters():
            p.add_(1.0)
    other.load_state_dict(ckpt["state_dict"])
    for a, b in zip(model.denoiser.parameters(), other.denoiser.parameters()):
        assert torch.equal(a, b)


def test_export_writes_a_pipeline_with_the_ema_weights(parts, tmp_path):
    model = make_model(parts)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.01)
    model.ema.update(model.denoiser)
    model.export(tmp_path / "pipe")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    for (name, p), shadow in zip(pipe.denoiser.named_parameters(), model.ema.shadow):
        torch.testing.assert_close(p, shadow, msg=name)
    assert pipe.config.height == 16


def test_sd15_config_counts_exactly_the_stable_diffusion_parameters():
    import yaml

    from ldm.cli.train import CONFIG_ROOT
    from ldm.modules.unet import UNet, UNetConfig

    config = yaml.safe_load((CONFIG_ROOT / "ldm" / "sd15.yaml").read_text())
    with torch.device("meta"):
        unet = UNet(UNetConfig(**{k: v for k, v in config["model"]["init_args"]["denoiser"].items() if k != "type"}))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_pooled_conditioning_drops_pooled_with_the_tokens(parts):
    model = make_model(parts, pooled_conditioning=True)
    assert model.denoiser.config.pooled_dim == model.text_encoder.pooled_dim
    batch = image_batch(8)
    _, cond = model.latents_and_conditioning(batch)
    torch.testing.assert_close(cond.pooled, model.text_encoder.encode_text(batch["caption"])[1])
    cond = Conditioning.cat([cond] * 100)
    torch.manual_seed(0)
    dropped = drop_for_guidance(cond, model.empty_conditioning(), 0.5)
    empty = model.empty_conditioning().pad_to(cond.length)
    dropped_tokens = (dropped.tokens == empty.tokens).flatten(1).all(1)
    dropped_pooled = (dropped.pooled == empty.pooled).all(1)
    assert torch.equal(dropped_tokens, dropped_pooled) and 0.35 < dropped_pooled.float().mean() < 0.65
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_trainers_mixed_precision_reaches_the_denoiser(parts, cached, accelerator):
    """Under a Trainer's bf16-mixed precision (the GPU overlays' setting) the denoiser runs inside the Trainer's
    autocast, in training and validation, from image batches (bf16 latents out of the autocast VAE) and from cached
    fp32 latents alike: the fast path must neither switch that autocast off nor meet bf16 inputs with fp32 weights."""
    import pytorch_lightning as pl

    model = make_model(parts, sample_every_n_val=0)
    batch = image_batch()
    if cached:
        z0, cond = model.latents_and_conditioning(batch, sample=False)
        batch = {"latent_mean": z0, "latent_std": torch.zeros_like(z0), "cond": cond}
    seen, inputs = [], []
    model.denoiser.register_forward_hook(lambda m, args, out: seen.append((m.training, out.dtype)))
    model.denoiser.register_forward_hook(lambda m, args, out: inputs.append(args[:2]))
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    loader = torch.utils.data.DataLoader  # batch_size=None: each item is a whole batch
    trainer.fit(model, loader([batch] * 2, batch_size=None), loader([batch], batch_size=None))
    assert trainer.global_step == 2 and model.fast.name == "ambient-sdpa"
    assert seen[:2] == [(True, torch.bfloat16)] * 2  # the two training steps
    assert len(seen) > 2 and set(seen[2:]) == {(False, torch.bfloat16)}  # the validation losses
    # what goes in stays fp32 (autocast casts inside): latents, and timesteps not rounded to bf16's 8 bits
    assert {(x.dtype, t.dtype) for x, t in inputs} == {(torch.float32, torch.float32)}
