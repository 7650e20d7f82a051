"""Our AutoencoderKL against diffusers' AutoencoderKL: same geometry, same outputs, lossless conversion."""

from pathlib import Path

import pytest
import torch
import yaml

from ldm.interop.diffusers_vae import (
    convert_diffusers_folder,
    from_diffusers,
    from_diffusers_config,
    from_diffusers_state_dict,
    key_map,
    save_diffusers_folder,
    to_diffusers,
    to_diffusers_config,
    to_diffusers_state_dict,
)
from ldm.io import load_part
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]
SD_VAE_PARAMS = 83_653_863  # diffusers' Stable Diffusion AutoencoderKL (kl-f8)

CONFIGS = {
    "f2-mid-attn": AutoencoderKLConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4,
                                       resolution=16, scaling_factor=0.5, shift_factor=0.1),
    "f4-level-attn": AutoencoderKLConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[8],
                                         mid_attention=False, z_channels=3, norm_groups=4, resolution=32),
}


def randomized(cfg: AutoencoderKLConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).eval()
    with torch.no_grad():  # move GroupNorm affine params off their (1, 0) init so they are checked too
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def assert_same_outputs(ours: AutoencoderKL, theirs, size: int) -> None:
    x = torch.rand(2, ours.config.in_channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post, dist = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(post.mean, dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, dist.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(post.mean), theirs.decode(dist.mean).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name):
    cfg = CONFIGS[name]
    ours = randomized(cfg)
    theirs = to_diffusers(ours).eval()
    assert theirs.config.scaling_factor == cfg.scaling_factor
    assert_same_outputs(ours, theirs, cfg.resolution)
    back = from_diffusers(theirs)
    assert back.config == cfg
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_kl_f8_geometry_matches_stable_diffusion_vae():
    data = yaml.safe_load((REPO / "configs" / "vae" / "kl-f8.yaml").read_text())
    cfg = AutoencoderKLConfig(**data["model"]["init_args"]["vae"])
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        theirs = diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                         down_block_types=["DownEncoderBlock2D"] * 4,
                                         up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                                         norm_num_groups=32, sample_size=512)
    assert sum(p.numel() for p in ours.parameters()) == SD_VAE_PARAMS
    assert sum(p.numel() for p in theirs.parameters()) == SD_VAE_PARAMS
    mapping = key_map(cfg)
    assert set(mapping.values()) == set(theirs.state_dict())
    assert all(ours.state_dict()[k].shape == theirs.state_dict()[v].shape for k, v in mapping.items())
    assert from_diffusers_config(dict(theirs.config)) == AutoencoderKLConfig(resolution=512, scaling_factor=0.18215)
    assert cfg.downsample_factor == 8


def test_folder_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = CONFIGS["f4-level-attn"]
    ours = randomized(cfg, seed=2)
    save_diffusers_folder(ours, tmp_path / "diffusers_vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "diffusers_vae").eval()
    assert_same_outputs(ours, theirs, 32)
    theirs.save_pretrained(tmp_path / "saved_by_diffusers")
    part = load_part(convert_diffusers_folder(tmp_path / "saved_by_diffusers", tmp_path / "ldm_vae"))
    assert isinstance(part, AutoencoderKL) and part.config == cfg
    for a, b in zip(ours.state_dict().values(), part.state_dict().values()):
        assert torch.equal(a, b)


def test_legacy_attention_names_and_errors():
    cfg = CONFIGS["f2-mid-attn"]
    ours = randomized(cfg)
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v
              for k, v in to_diffusers_state_dict(ours.state_dict(), cfg).items()}
    assert any(".query." in k for k in legacy)
    restored = from_diffusers_state_dict(legacy, cfg)
    assert all(torch.equal(restored[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="double_z"):
        to_diffusers_config(AutoencoderKLConfig(ch=8, norm_groups=4, double_z=False))
    with pytest.raises(Exception, match="missing"):
        from_diffusers_state_dict({k: v for k, v in legacy.items() if "decoder" not in k}, cfg)
    with pytest.raises(Exception, match="no weights"):
        convert_diffusers_folder(REPO / "configs", REPO / "unused")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compvis_layout_is_what_diffusers_single_file_converter_reads(name):
    """Our CompVis names (1x1-conv attention), fed to diffusers' own single-file VAE converter, give diffusers'
    state dict (that converter knows only the SD geometry: attention in the middle block); and they read back
    bit-identically."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ldm.interop.diffusers_vae import key_table

    cfg = CONFIGS[name]
    ours = randomized(cfg)
    table = key_table(cfg, "compvis").with_prefix("first_stage_model.")
    single = table.to_theirs(ours.state_dict())
    assert any(v.ndim == 4 and ".attn" in k and k.endswith("q.weight") for k, v in single.items())
    expected = to_diffusers_state_dict(ours.state_dict(), cfg)
    back = table.to_ours(single)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    if cfg.attn_resolutions:
        return
    converted = convert_ldm_vae_checkpoint(single, to_diffusers_config(cfg))
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], v) for k, v in expected.items())
