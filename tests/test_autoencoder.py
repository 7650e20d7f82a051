"""The VAE building blocks: encoder/decoder geometry, the Gaussian posterior, the PatchGAN and its losses."""

import math

import pytest
import torch

from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.discriminator import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from ldm.modules.distributions import DiagonalGaussian


def tiny(**kw) -> AutoencoderKLConfig:
    base = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4, resolution=16)
    return AutoencoderKLConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,size,latent", [
    (dict(), 16, (4, 8, 8)),                                                         # f=2
    (dict(ch_mult=[1, 2, 2], z_channels=3), 32, (3, 8, 8)),                          # f=4
    (dict(ch_mult=[1, 1, 2, 2], num_res_blocks=2, attn_resolutions=[4], resolution=32), 32, (4, 4, 4)),  # f=8
    (dict(double_z=False, mid_attention=False), 16, (4, 8, 8)),                     # deterministic
    (dict(in_channels=1, out_channels=1), 16, (4, 8, 8)),                            # grayscale
    (dict(patch_size=2), 16, (4, 4, 4)),                                             # f=2*2
    (dict(patch_size=4, ch_mult=[1], mid_attention=False), 32, (4, 8, 8)),          # f=4*1
    (dict(patch_size=2, ch_mult=[1, 2, 2], in_channels=1, out_channels=1), 32, (4, 4, 4)),  # f=2*4, grayscale
])
def test_encoder_decoder_shapes(kw, size, latent):
    torch.manual_seed(0)
    cfg = tiny(**kw)
    vae = AutoencoderKL(cfg)
    x = torch.randn(2, cfg.in_channels, size, size)
    moments = vae.encoder(x)
    assert moments.shape == (2, (2 if cfg.double_z else 1) * cfg.z_channels, *latent[1:])
    post = vae.encode(x)
    assert post.mean.shape == (2, *latent)
    recon, _ = vae(x)
    assert recon.shape == (2, cfg.out_channels, size, size)
    assert vae.decode(torch.randn(3, *latent)).shape == (3, cfg.out_channels, size, size)
    # non-square inputs work too
    assert vae.encode(torch.randn(1, cfg.in_channels, size, 2 * size)).mean.shape[-1] == 2 * latent[-1]


def test_attention_placement():
    vae = AutoencoderKL(tiny(ch_mult=[1, 2, 2], attn_resolutions=[8], resolution=32, mid_attention=False))
    assert [lvl.attns is not None for lvl in vae.encoder.down] == [False, False, True]
    assert [lvl.attns is not None for lvl in vae.decoder.up] == [True, False, False]  # deepest first
    assert vae.encoder.mid.attn is None and len(vae.decoder.up[0].blocks) == 2


def test_bad_input_gives_clear_errors():
    vae = AutoencoderKL(tiny(ch_mult=[1, 2, 2], resolution=32))
    with pytest.raises(ValueError, match="3-channel"):
        vae.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        vae.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latents shaped"):
        vae.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderKLConfig(ch=12, norm_groups=8)
    with pytest.raises(ValueError, match="num_res_blocks"):
        AutoencoderKLConfig(num_res_blocks=0)


@pytest.mark.parametrize("patch_size,ch_mult,f", [(1, [1, 2], 2), (2, [1, 2], 4), (4, [1], 4), (2, [1, 1, 2], 8)])
def test_patch_size_sets_the_downsampling_factor(patch_size, ch_mult, f):
    cfg = tiny(patch_size=patch_size, ch_mult=ch_mult, resolution=32)
    vae = AutoencoderKL(cfg)
    assert cfg.downsample_factor == vae.downsample_factor == f
    assert (vae.encoder.conv_in.in_channels == 3 * patch_size**2
            and vae.decoder.conv_out.out_channels == 3 * patch_size**2)
    assert vae.encode(torch.randn(1, 3, 32, 32)).mean.shape[-2:] == (32 // f, 32 // f)


def test_patch_size_wraps_the_conv_stack_in_pixel_unshuffle_and_shuffle():
    """The encoder's first conv sees space-to-depth input; the decoder's output is depth-to-space of its
    last conv (Shi et al. 2016, sub-pixel layout: channel c*p^2 + i*p + j -> pixel (p*y + i, p*x + j))."""
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny(patch_size=2)).eval()
    seen = {}
    vae.encoder.conv_in.register_forward_hook(lambda m, args, out: seen.update(enc_in=args[0]))
    vae.decoder.conv_out.register_forward_hook(lambda m, args, out: seen.update(dec_out=out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        recon, _ = vae(x, sample_posterior=False)
    assert seen["enc_in"].shape == (2, 12, 8, 8)
    torch.testing.assert_close(seen["enc_in"][:, 4 * 1 + 2 * 1 + 0], x[:, 1, 1::2, 0::2], rtol=0, atol=0)
    assert seen["dec_out"].shape == (2, 12, 8, 8)
    torch.testing.assert_close(recon[:, 2, 0::2, 1::2], seen["dec_out"][:, 4 * 2 + 2 * 0 + 1], rtol=0, atol=0)


def test_patch_size_places_attention_by_feature_size():
    # 32 px, patch 2: encoder levels run at 16 and 8 px, so attn_resolutions=[8] is the second level
    vae = AutoencoderKL(tiny(patch_size=2, ch_mult=[1, 2], resolution=32, attn_resolutions=[8], mid_attention=False))
    assert [lvl.attns is not None for lvl in vae.encoder.down] == [False, True]
    assert [lvl.attns is not None for lvl in vae.decoder.up] == [True, False]  # deepest first


def test_patch_size_bad_input_gives_clear_errors():
    vae = AutoencoderKL(tiny(patch_size=2, ch_mult=[1, 2], resolution=32))  # f=4
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        vae.encode(torch.randn(1, 3, 30, 32))  # divisible by the patch, not by f
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        vae.encode(torch.randn(1, 3, 32, 34))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="patch_size must be >= 1"):
            AutoencoderKLConfig(patch_size=bad)


def test_scaled_latents_apply_scale_and_shift():
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny(scaling_factor=2.5, shift_factor=-0.25)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(x).mode()
        z = vae.encode_latents(x)
        torch.testing.assert_close(z, (mode + 0.25) * 2.5)
        torch.testing.assert_close(vae.decode_latents(z), vae.decode(mode), atol=1e-5, rtol=1e-4)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(vae.encode_latents(x, sample=True, generator=g1),
                           vae.encode_latents(x, sample=True, generator=g2))
        assert not torch.equal(vae.encode_latents(x, sample=True), z)


def test_kl_of_standard_normal_is_zero_and_matches_closed_form():
    zeros = torch.zeros(3, 4, 5, 5)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(3))
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    q = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(q.kl(), ref)
    mean2, logvar2 = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    p = DiagonalGaussian(mean2, logvar2)
    ref2 = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                             torch.distributions.Normal(mean2, (0.5 * logvar2).exp())).sum((1, 2, 3))
    torch.testing.assert_close(q.kl(p), ref2)
    z = torch.randn(3, 4, 5, 5)
    ref_nll = -torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(z).sum((1, 2, 3))
    torch.testing.assert_close(q.nll(z), ref_nll)


def test_the_kl_of_a_bf16_posterior_is_summed_in_fp32():
    """Under autocast the encoder's moments are bf16; summed in bf16 over C·H·W the KL would round to 8 bits."""
    torch.manual_seed(0)
    q = DiagonalGaussian((3 * torch.randn(2, 4, 16, 16)).bfloat16(), torch.randn(2, 4, 16, 16).bfloat16())
    exact = 0.5 * (q.mean.double().pow(2) + q.var.double() - 1.0 - q.logvar.double()).sum((1, 2, 3))
    assert q.kl().dtype == torch.float32
    torch.testing.assert_close(q.kl().double(), exact, rtol=1e-6, atol=0)


def test_posterior_sampling_and_clamp():
    mean = torch.full((1, 2, 100, 100), 3.0)
    q = DiagonalGaussian(mean, torch.full_like(mean, math.log(0.25)))  # std 0.5
    s1 = q.sample(torch.Generator().manual_seed(0))
    assert torch.equal(s1, q.sample(torch.Generator().manual_seed(0)))
    assert abs(s1.mean().item() - 3.0) < 0.01 and abs(s1.std().item() - 0.5) < 0.01
    assert torch.equal(q.mode(), mean)
    clamped = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]]))
    assert clamped.logvar.flatten().tolist() == [-30.0, 20.0]
    det = DiagonalGaussian(mean)
    assert torch.equal(det.sample(), mean) and torch.equal(det.kl(), torch.zeros(1))
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian.from_parameters(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("n_layers,out", [(1, 14), (2, 6), (3, 2)])
def test_patch_discriminator_shapes(n_layers, out):
    d = PatchDiscriminator(3, ndf=8, n_layers=n_layers, norm="batch")
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, out, out)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


def test_gan_losses_analytic():
    ones = torch.ones(2, 1, 3, 3)
    assert discriminator_loss(2 * ones, -2 * ones, "hinge").item() == 0.0       # both margins met
    assert discriminator_loss(0 * ones, 0 * ones, "hinge").item() == 1.0
    torch.testing.assert_close(discriminator_loss(0 * ones, 0 * ones, "vanilla"), torch.tensor(math.log(2.0)))
    assert generator_loss(3 * ones, "hinge").item() == -3.0
    torch.testing.assert_close(generator_loss(0 * ones, "vanilla"), torch.tensor(math.log(2.0)))
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(ones, "wgan")


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.randn(4, 3, requires_grad=True)
    rec, gan = 3.0 * w.sum(), -0.5 * w.sum()  # gradients 3*1 and -0.5*1, norms 3*sqrt(12), 0.5*sqrt(12)
    n = math.sqrt(12)
    weight = adaptive_weight(rec, gan, w, delta=1e-4)
    assert weight.item() == pytest.approx(3 * n / (0.5 * n + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    assert adaptive_weight(1e6 * w.sum(), 1e-6 * w.sum(), w, max_weight=10.0).item() == 10.0


def test_lpips_properties_and_local_weight_loading(tmp_path):
    from safetensors.torch import save_file

    from ldm.modules.lpips import LPIPS

    torch.manual_seed(0)
    ref = LPIPS().eval()
    with torch.no_grad():
        for lin in ref.lin:
            lin.weight.abs_()  # LPIPS heads are non-negative
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    d = ref(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    torch.testing.assert_close(d, ref(y, x))
    assert ref(x, x).abs().max().item() < 1e-6
    y.requires_grad_(True)
    ref(x, y).sum().backward()
    assert y.grad.abs().sum() > 0
    # torchvision's VGG16 keys in one file, the lpips package's linear heads in another
    state = ref.state_dict()
    vgg = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(1)  # ignored
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save({f"lin{i}.model.1.weight": state[f"lin.{i}.weight"] for i in range(5)}, tmp_path / "vgg.pth")
    loaded = LPIPS.from_file(tmp_path)
    torch.testing.assert_close(loaded(x, y.detach()), ref(x, y.detach()))
    (tmp_path / "vgg.pth").unlink()
    with pytest.raises(ValueError, match="linear heads"):
        LPIPS.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="lpips_path"):
        LPIPS.from_file(tmp_path / "missing.pth")
