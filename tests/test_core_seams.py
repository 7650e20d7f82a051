"""The seams of the core: the Conditioning object and the denoiser protocol.

A denoiser written here (not the U-Net) trains through LatentDiffusion, exports, and samples through the
unchanged TextToImagePipeline once it is registered; the conditioning object round-trips through a file,
is dropped for CFG at the requested rate, and CFG's one batched call equals two separate calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_parts import export_tiny_parts
from torch import nn

from ldm import registry
from ldm.conditioning import Conditioning, drop_for_guidance
from ldm.diffusion.guidance import classifier_free_guidance, guided_model
from ldm.modules.embeddings import TimestepEmbedding
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import TextToImagePipeline


# ---- a denoiser that is not the U-Net ----------------------------------------------------------------
@dataclass
class PoolingDenoiserConfig:
    in_channels: int = 4
    out_channels: int = 4
    context_dim: int = 32
    pooled_dim: int | None = None
    hidden: int = 8


class PoolingDenoiser(nn.Module):
    """conv(x) + the masked mean of the tokens + a time embedding, per channel: the protocol and nothing more."""

    config_class = PoolingDenoiserConfig

    def __init__(self, config: PoolingDenoiserConfig) -> None:
        super().__init__()
        self.config = config
        self.conv_in = nn.Conv2d(config.in_channels, config.hidden, 3, padding=1)
        self.text = nn.Linear(config.context_dim, config.hidden)
        self.time = TimestepEmbedding(config.hidden, config.hidden)
        self.conv_out = nn.Conv2d(config.hidden, config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        mask = cond.full_mask().to(x.dtype)[..., None]
        text = (cond.tokens * mask).sum(1) / mask.sum(1)
        h = self.conv_in(x) + (self.text(text) + self.time(t.expand(x.shape[0]).float()))[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(registry.PARTS, "PoolingDenoiser", (__name__, "denoiser"))
    monkeypatch.setitem(registry.DENOISERS, "pooling", "PoolingDenoiser")


def test_a_new_denoiser_trains_exports_and_samples_through_the_unchanged_pipeline(tmp_path, registered):
    from ldm.models.latent_diffusion import LatentDiffusion

    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    torch.manual_seed(0)
    model = LatentDiffusion(vae_path=str(vae_dir), text_encoder_path=str(te_dir), resolution=16,
                            denoiser={"type": "pooling", "hidden": 16}, p_uncond=0.0, ema_decay=None)
    assert isinstance(model.denoiser, PoolingDenoiser) and model.denoiser.config.context_dim == 32
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, "caption": ["a red circle", "a blue star"] * 4}
    z0, cond = model.latents_and_conditioning(batch, sample=False)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(z0.shape, generator=g)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=1e-2)
    first = model.loss(z0, cond, t, noise).item()
    for _ in range(60):
        opt.zero_grad()
        model.loss(z0, cond, t, noise).backward()
        opt.step()
    assert model.loss(z0, cond, t, noise).item() < 0.7 * first

    model.export(tmp_path / "pipe")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.denoiser) is PoolingDenoiser
    for a, b in zip(pipe.denoiser.state_dict().values(), model.denoiser.state_dict().values()):
        assert torch.equal(a, b)
    images = pipe.generate(["a red circle", "a blue star"], steps=3, guidance=3.0, progress=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])  # the prompt reaches the denoiser


def test_an_unregistered_denoiser_class_in_a_part_is_refused(tmp_path, registered, monkeypatch):
    from ldm.io import PartError, save_part

    save_part(PoolingDenoiser(PoolingDenoiserConfig()), tmp_path / "unet")
    monkeypatch.delitem(registry.PARTS, "PoolingDenoiser")
    from ldm.io import load_part

    with pytest.raises(PartError, match="only ldm's registered classes"):
        load_part(tmp_path / "unet", kind="denoiser")


# ---- the conditioning object ------------------------------------------------------------------------
def conditioning(batch: int = 3, length: int = 5, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    return Conditioning(torch.randn(batch, length, 6, generator=g) * mask[..., None], mask,
                        torch.randn(batch, 4, generator=g), {"guidance_scale": torch.rand(batch, generator=g)})


def test_conditioning_round_trips_through_a_safetensors_file(tmp_path):
    cond = conditioning()
    save_file(cond.to_tensors(), str(tmp_path / "c.safetensors"))
    back = Conditioning.from_tensors(load_file(str(tmp_path / "c.safetensors")))
    for a, b in zip(dataclasses.astuple(cond), dataclasses.astuple(back)):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)
    assert back.mask.dtype == torch.bool


def test_cfg_dropout_rate_and_rows():
    cond = Conditioning.cat([conditioning(seed=s) for s in range(1000)])  # 3000 rows
    empty = Conditioning(torch.full((1, 2, 6), 7.0), torch.tensor([[True, True]]), torch.full((1, 4), 7.0),
                         {"guidance_scale": torch.tensor([0.5])})
    torch.manual_seed(0)
    dropped = drop_for_guidance(cond, empty, 0.2)
    padded = empty.pad_to(cond.length)
    is_empty = (dropped.tokens == padded.tokens).flatten(1).all(1) & (dropped.mask == padded.mask).all(1)
    assert abs(is_empty.float().mean().item() - 0.2) < 3 * (0.2 * 0.8 / 3000) ** 0.5
    assert torch.equal(is_empty, (dropped.pooled == 7.0).all(1))  # pooled dropped with the tokens
    assert torch.equal(dropped.tokens[~is_empty], cond.tokens[~is_empty])
    assert torch.equal(dropped.extras["guidance_scale"][is_empty], torch.full((int(is_empty.sum()),), 0.5))
    assert drop_for_guidance(cond, empty, 0.0) is cond
    with pytest.raises(ValueError, match="probability"):
        drop_for_guidance(cond, empty, 1.5)


def test_one_batched_cfg_call_equals_two_calls_with_different_token_lengths():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                           num_heads=2, context_dim=6, num_groups=4, pooled_dim=4)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.3)
    cond = dataclasses.replace(conditioning(batch=3, length=5), extras={})
    uncond = Conditioning(torch.randn(1, 2, 6), torch.tensor([[True, True]]), torch.randn(1, 4))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 400.0, 900.0])
    with torch.no_grad():
        c, u = unet(x, t, cond), unet(x, t, uncond.expand(3))
        guided = classifier_free_guidance(unet, cond, uncond, 5.0)(x, t)
        torch.testing.assert_close(guided, u + 5.0 * (c - u), atol=1e-4, rtol=1e-4)  # x5 amplifies rounding
        torch.testing.assert_close(guided_model(unet, cond, uncond, 1.0)(x, t), c)  # no CFG batch at scale 1


def test_conditioning_shape_checks_and_transforms():
    cond = conditioning(batch=2, length=5)
    with pytest.raises(ValueError, match="tokens must be"):
        Conditioning(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="mask must be"):
        Conditioning(torch.zeros(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size 2"):
        Conditioning(torch.zeros(2, 5, 3), extras={"label": torch.zeros(3)})
    trimmed = cond.trim()
    assert (trimmed.length == int(cond.mask.sum(1).max())
            and torch.equal(trimmed.tokens, cond.tokens[:, :trimmed.length]))
    assert cond.index([1]).batch_size == 1 and torch.equal(cond.index([1]).tokens, cond.tokens[1:])
    assert cond.index([0]).expand(4).tokens.shape == (4, 5, 6)
    half = cond.to(dtype=torch.float16)
    assert half.tokens.dtype == torch.float16 and half.mask.dtype == torch.bool
