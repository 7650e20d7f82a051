"""SDXL size/crop micro-conditioning: zero at initialisation, a real effect once trained, defaults at sampling."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_parts import TINY_UNET, export_tiny_parts, tiny_pipeline

from ldm.conditioning import Conditioning
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.micro import SIZE_CONDITIONS, ExtraConditionEmbedding, size_extras, with_default_extras
from ldm.modules.unet import UNet, UNetConfig


def _unet(**options) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=4, out_channels=4, context_dim=32, **{**TINY_UNET, **options}))


def _inputs(batch=3, extras=None):
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(batch, 5, 32, generator=g), extras=extras or {})
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0, 990.0][:batch]), cond


def _sizes(original, crop=(0, 0), target=(32, 32), batch=3):
    return size_extras(torch.tensor([list(original)] * batch), torch.tensor([list(crop)] * batch), target)


def test_a_new_size_embedding_adds_exactly_zero():
    plain, micro = _unet(), _unet(extra_conditions=dict(SIZE_CONDITIONS))
    missing, unexpected = micro.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("extra_embed.") for k in missing)
    with torch.no_grad():
        for p in plain.parameters():  # the zero-initialised output conv would hide every difference
            p.add_(torch.randn_like(p) * 0.02)
        micro.load_state_dict(plain.state_dict(), strict=False)
    x, t, cond = _inputs()
    reference = plain(x, t, cond)
    for original, crop in (((32, 32), (0, 0)), ((600, 90), (40, 7))):
        out = micro(x, t, Conditioning(cond.tokens, extras=_sizes(original, crop)))
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_trained_size_conditioning_changes_the_output():
    micro = _unet(extra_conditions=dict(SIZE_CONDITIONS))
    with torch.no_grad():
        for p in micro.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, cond = _inputs()

    def run(original, crop=(0, 0)):
        return micro(x, t, Conditioning(cond.tokens, extras=_sizes(original, crop)))

    base = run((32, 32))
    torch.testing.assert_close(run((32, 32)), base)
    assert (run((64, 16)) - base).abs().max() > 1e-4
    assert (run((32, 32), (8, 0)) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="extra_conditions.*lacks"):
        micro(x, t, cond)
    with pytest.raises(ValueError, match="must be"):
        micro(x, t, Conditioning(cond.tokens, extras={**_sizes((32, 32)), "crop_coords": torch.zeros(3, 3)}))


def test_the_embedding_sees_each_scalar_of_each_sample():
    emb = ExtraConditionEmbedding({"a": 2, "b": 1}, 16)
    torch.nn.init.normal_(emb.linear_2.weight)
    values = {"a": torch.tensor([[1.0, 2.0], [1.0, 2.0]]), "b": torch.tensor([[3.0], [4.0]])}
    out = emb(values, 2)
    assert out.shape == (2, 16) and not torch.allclose(out[0], out[1])       # only b differs between the rows
    swapped = emb({"a": values["a"].flip(1), "b": values["b"]}, 2)
    assert not torch.allclose(swapped, out)                                  # the order of a's scalars matters


def test_the_pipeline_fills_the_sampling_defaults_and_warns_at_untrained_sizes():
    pipe = tiny_pipeline(extra_conditions=dict(SIZE_CONDITIONS))
    seen = []
    pipe.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[2].extras))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(["a red circle"], steps=1, guidance=2.0, progress=False)
    assert seen[0]["original_size"].tolist() == [[16, 16]] * 2 and seen[0]["crop_coords"].abs().sum() == 0
    with pytest.warns(UserWarning, match="generating at 24x16 but the denoiser was trained at 16x16"):
        pipe(["a red circle"], steps=1, height=24, width=16, progress=False)
    assert seen[-1]["target_size"].tolist()[0] == [24, 16]
    pipe.config.sizes = [[24, 16]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(["a red circle"], steps=1, height=24, width=16, progress=False)
    cond = Conditioning(torch.zeros(1, 2, 32), extras={"original_size": torch.tensor([[9.0, 9.0]])})
    filled = with_default_extras(pipe.denoiser, cond, 16, 16)
    assert filled.extras["original_size"].tolist() == [[9.0, 9.0]]                # given values are kept


def test_latent_diffusion_feeds_the_batch_sizes_to_the_denoiser(tmp_path):
    vae_dir, te_dir = export_tiny_parts(tmp_path)
    model = LatentDiffusion(vae_path=str(vae_dir), text_encoder_path=str(te_dir), denoiser=dict(TINY_UNET),
                            resolution=16, size_conditioning=True)
    assert model.denoiser.config.extra_conditions == SIZE_CONDITIONS
    batch = {"image": torch.rand(2, 3, 16, 24) * 2 - 1, "caption": ["a", "b"],
             "original_size": torch.tensor([[100, 150], [16, 24]]), "crop_coords": torch.tensor([[3, 0], [0, 0]])}
    z0, cond = model.latents_and_conditioning(batch, sample=False)
    assert z0.shape[2:] == (4, 6)
    assert cond.extras["original_size"].tolist() == [[100, 150], [16, 24]]
    assert (cond.extras["crop_coords"].tolist() == [[3, 0], [0, 0]]
            and cond.extras["target_size"].tolist() == [[16, 24]] * 2)
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    pipe = model.pipeline()
    assert pipe.denoiser.config.extra_conditions == SIZE_CONDITIONS
