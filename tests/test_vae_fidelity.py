"""What a VAE keeps: probe agreement between originals and reconstructions, PSNR/SSIM, VAE loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.evaluation.shapes_probe import ALL_THREE, ATTRIBUTES, ShapesProbe, ShapesProbeConfig, load_labelled, to_unit
from ldm.evaluation.vae_fidelity import load_vae, psnr, reconstruct, reconstruction_fidelity
from ldm.io import PartError, save_part
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.distributions import DiagonalGaussian

GEOMETRY = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4, resolution=32, patch_size=2,
                mid_attention=False)


class PixelVAE(nn.Module):
    """A stand-in VAE whose latent is the image itself and whose decoder applies ``edit`` to it."""

    def __init__(self, edit=lambda z: z) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the VAE a device
        self.edit = edit

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.edit(z)


@pytest.fixture(scope="module")
def probe() -> ShapesProbe:
    torch.manual_seed(0)
    return ShapesProbe(ShapesProbeConfig(width=8, hidden=16)).eval()


def test_psnr_analytic():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.2            # 0.1 in [0, 1]: MSE 1e-2 -> 20 dB
    y[1, :, :2] += 0.02    # 0.01 on half the pixels: MSE 5e-5 -> 43.01 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 10 * torch.log10(torch.tensor(2e4)).item()]))


def test_exact_reconstructions_keep_everything(shapes_dir, probe):
    result = reconstruction_fidelity(PixelVAE(), probe, shapes_dir)
    n = len(load_labelled(shapes_dir, "val")[1])
    assert result["n"] == n and 0 < n < 64  # single-object val images only
    assert result["kept"] == 1.0 and all(result[f"kept_{a}"] == 1.0 for a in ATTRIBUTES)
    assert result["probe_reconstructions"] == result["probe_originals"]
    assert result["psnr"] == pytest.approx(120.0)  # MSE clamped at 1e-12
    assert result["ssim"] == pytest.approx(1.0, abs=1e-3)


def test_kept_counts_agreement_with_the_original_reading(shapes_dir, probe):
    """Mirrored reconstructions: kept is the fraction of images whose colour, shape and position readings
    all survive the mirror, computed here straight from the probe's logits."""
    result = reconstruction_fidelity(PixelVAE(lambda z: z.flip(3)), probe, shapes_dir, n=40)
    x = to_unit(load_labelled(shapes_dir, "val", 40)[0])
    with torch.no_grad():
        a, b = probe(x), probe(x.flip(3))
    same = {k: a[k].argmax(1) == b[k].argmax(1) for k in ATTRIBUTES}
    expected = torch.stack([same[k] for k in ALL_THREE]).all(0).float().mean().item()
    assert result["n"] == 40
    assert result["kept"] == pytest.approx(expected)
    assert 0.0 < result["kept"] < 1.0  # the random probe reads some mirrored images differently
    for k in ATTRIBUTES:
        assert result[f"kept_{k}"] == pytest.approx(same[k].float().mean().item())


def test_metrics_of_a_real_vae_match_torchmetrics(shapes_dir, probe):
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(**GEOMETRY)).eval()
    result = reconstruction_fidelity(vae, probe, shapes_dir, n=16, batch_size=5)
    x = to_unit(load_labelled(shapes_dir, "val", 16)[0])
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    torch.testing.assert_close(reconstruct(vae, x, batch_size=5), recon, atol=1e-5, rtol=0)
    x01, r01 = (x + 1) / 2, (recon + 1) / 2
    ref_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))(r01, x01)
    ref_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(r01, x01)
    assert result["psnr"] == pytest.approx(ref_psnr.item(), rel=1e-5)
    assert result["ssim"] == pytest.approx(ref_ssim.item(), rel=1e-5)
    assert result["psnr"] < 20 and result["kept"] < 1.0  # an untrained VAE loses the content


def test_load_vae_from_part_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(**GEOMETRY)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    save_part(vae, tmp_path / "part")
    state = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    state["logvar"] = torch.zeros(())  # other module weights are ignored
    torch.save({"state_dict": state, "hyper_parameters": {"vae": GEOMETRY, "lr": 1e-3}}, tmp_path / "last.ckpt")
    for source in (tmp_path / "part", tmp_path / "last.ckpt"):
        loaded = load_vae(source)
        assert not loaded.training and loaded.config.patch_size == 2
        torch.testing.assert_close(reconstruct(loaded, x), reconstruct(vae, x), rtol=0, atol=0)
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 1e-3}}, tmp_path / "other.ckpt")
    with pytest.raises(PartError, match="no `vae` hyper-parameter"):
        load_vae(tmp_path / "other.ckpt")
    del state["vae.quant_conv.weight"]
    torch.save({"state_dict": state, "hyper_parameters": {"vae": GEOMETRY}}, tmp_path / "broken.ckpt")
    with pytest.raises(PartError, match="missing keys: quant_conv.weight"):
        load_vae(tmp_path / "broken.ckpt")
