"""Parity with diffusers' UNet2DConditionModel (the Stable Diffusion U-Net) through the weight converter,
and a smoke run of the speed benchmark."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ldm.cli import main as ldm_main
from ldm.conditioning import Conditioning as C
from ldm.interop.diffusers_unet import config_from_diffusers, diffusers_config, diffusers_to_ldm, ldm_to_diffusers
from ldm.modules.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "num_heads": UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                            num_heads=2, context_dim=12, num_groups=8),
    # SD-like: no attention at the deepest level, head_dim instead of heads, depth 2, 2 res blocks
    "head_dim": UNetConfig(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                           num_heads=None, head_dim=4, transformer_depth=2, context_dim=10, num_groups=4),
}


def diffusers_unet(config: UNetConfig, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**diffusers_config(config), **overrides}).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_output_as_diffusers_with_converted_weights(name: str):
    config = CONFIGS[name]
    theirs = diffusers_unet(config)
    ours = UNet(config).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), config), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 6, config.context_dim, generator=g)
    t = torch.tensor([0.0, 17.25, 999.0])  # fractional timesteps too
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        expected_masked = theirs(x, t, ctx, encoder_attention_mask=mask).sample
        assert expected.abs().max() > 0.1  # diffusers' random init is not zero: a real comparison
        torch.testing.assert_close(ours(x, t, C(ctx)), expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours(x, t, C(ctx, mask)), expected_masked, atol=2e-5, rtol=1e-4)


def test_linear_projection_checkpoints_convert_too():
    config = CONFIGS["num_heads"]
    theirs = diffusers_unet(config, use_linear_projection=True)
    ours = UNet(config).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), config))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.randn(2, 4, config.context_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, C(ctx)), theirs(x, t, ctx).sample, atol=2e-5, rtol=1e-4)
    back = ldm_to_diffusers(ours.state_dict(), config, linear_projection=True)
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip_is_exact(name: str):
    theirs = diffusers_unet(CONFIGS[name]).state_dict()
    back = ldm_to_diffusers(diffusers_to_ldm(theirs, CONFIGS[name]), CONFIGS[name])
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name: str):
    config = CONFIGS[name]
    assert config_from_diffusers(dict(diffusers_unet(config).config)) == config


def test_sd15_matches_diffusers_key_for_key_on_meta():
    config = UNetConfig.sd15()
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**diffusers_config(config))
        ours = UNet(config)
    assert sum(p.numel() for p in theirs.parameters()) == 859_520_964
    converted = diffusers_to_ldm(theirs.state_dict(), config)
    expected = ours.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    # the diffusers SD 1.5 config (attention_head_dim = 8 *heads*) maps back to ours
    sd15_diffusers = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
                      "cross_attention_dim": 768, "layers_per_block": 2, "norm_num_groups": 32,
                      "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    assert config_from_diffusers(sd15_diffusers) == config


def test_unsupported_diffusers_options_are_named():
    with pytest.raises(ValueError, match="class_embed_type"):
        config_from_diffusers({"block_out_channels": [32, 64], "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="only_cross_attention"):
        config_from_diffusers({"block_out_channels": [32, 64], "only_cross_attention": True})
    # SD 2.1's upcast_attention only changes the precision of fp16 attention scores: it converts
    assert config_from_diffusers({"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 2,
                                  "upcast_attention": True}).model_channels == 32
    with pytest.raises(ValueError, match="ff_mult=2"):
        diffusers_config(UNetConfig(model_channels=8, channel_mult=(1,), num_heads=2, context_dim=6, num_groups=4,
                                    attention_resolutions=(1,), ff_mult=2))


def test_benchmark_runs_and_writes_json(tmp_path):
    from ldm.bench import unet as bench

    tiny = CONFIGS["num_heads"]
    result = bench.run(tiny, batch=2, steps=1, warmup=0, rounds=1)
    assert result["params"] == sum(p.numel() for p in UNet(tiny).parameters())
    for model in ("ldm", "diffusers"):
        assert result[model]["train_img_s"] > 0 and result[model]["sample_img_s"] > 0
    ratio = result["ldm"]["train_img_s"] / result["diffusers"]["train_img_s"]
    assert result["train_img_s_ratio"] == pytest.approx(ratio)
    out = tmp_path / "unet.json"
    assert ldm_main(["bench", "unet", "--config", "shapes-s", "--batch", "2", "--steps", "1", "--warmup", "0",
                     "--rounds", "1", "--no-diffusers", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["results"][0]["name"] == "shapes-s" and "diffusers" not in saved["results"][0]


def test_pooled_conditioning_is_diffusers_projection_class_embedding():
    config = dataclasses.replace(CONFIGS["num_heads"], pooled_dim=7)
    theirs = diffusers_unet(config)
    assert diffusers_config(config)["class_embed_type"] == "projection"
    assert config_from_diffusers(dict(theirs.config)) == config
    ours = UNet(config).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), config), strict=True)
    g = torch.Generator().manual_seed(2)
    x, ctx, pooled = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g),
                      torch.randn(2, 7, generator=g))
    t = torch.tensor([3.0, 700.5])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, C(ctx, pooled=pooled)), theirs(x, t, ctx, class_labels=pooled).sample,
                                   atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="position embedding"):
        diffusers_config(dataclasses.replace(config, position_embedding=True))


def test_scale_shift_norm_is_diffusers_scale_shift_resnets():
    config = dataclasses.replace(CONFIGS["head_dim"], scale_shift_norm=True)
    theirs = diffusers_unet(config)
    assert config_from_diffusers(dict(theirs.config)) == config
    ours = UNet(config).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict(), config), strict=True)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, config.context_dim, generator=g)
    t = torch.tensor([5.0, 801.0])
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(ours(x, t, C(ctx)), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        config_from_diffusers({"block_out_channels": [32, 64], "resnet_time_scale_shift": "ada_group"})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compvis_layout_is_what_diffusers_single_file_converter_reads(name: str):
    """Our CompVis names, fed to diffusers' own single-file U-Net converter, give back diffusers' state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ldm.interop.diffusers_unet import key_table

    config = CONFIGS[name]
    theirs = diffusers_unet(config, use_linear_projection=name == "head_dim")
    ours = diffusers_to_ldm(theirs.state_dict(), config)
    compvis = key_table(config, "compvis", linear_projection=name == "head_dim").with_prefix("model.diffusion_model.")
    single = compvis.to_theirs(ours)
    converted = convert_ldm_unet_checkpoint(single, dict(theirs.config))
    assert converted.keys() == theirs.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in theirs.state_dict().items())
    back = compvis.to_ours(single)
    assert all(torch.equal(back[k], v) for k, v in ours.items())
