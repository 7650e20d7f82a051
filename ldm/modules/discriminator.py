"""PatchGAN discriminator and the adversarial losses of the VAE's perceptual-compression training.

* Discriminator: Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks"
  (pix2pix, 2017), Sec. 3.2.2 and appendix 6.1.2: a stack of 4x4 convolutions (stride 2, then 1)
  that classifies every overlapping N x N patch as real or fake, so it judges local texture only.
* Losses: hinge (Lim & Ye 2017; Miyato et al. 2018, eq. 16-17) or the non-saturating GAN loss
  (Goodfellow et al. 2014, eq. 1 and Sec. 3).
* Adaptive weight: Esser et al., "Taming Transformers" (VQGAN, 2021), eq. 7:
  lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), G_L the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GAN_LOSSES = ("hinge", "vanilla")
NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: (B, C, H, W) images -> (B, 1, h, w) real/fake logits, one per patch.

    ``n_layers=3`` is pix2pix's 70x70 PatchGAN (C64-C128-C256-C512, appendix 6.1.2); with fewer
    layers the receptive field shrinks (n_layers=2: 34x34, n_layers=1: 16x16).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"discriminator n_layers must be >= 1, got {n_layers}")
        use_bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=use_bias), _norm(norm, out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN initialisation (Radford et al. 2016, Sec. 4): conv ~ N(0, 0.02), norm scale ~ N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss, averaged over patches and halved (as in VQGAN).

    hinge:   0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])        (Miyato et al. 2018, eq. 16)
    vanilla: 0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))]) = BCE (Goodfellow et al. 2014, eq. 1)
    """
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "vanilla":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_LOSSES}")


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator's adversarial loss: hinge -E[D(x_hat)] (Miyato et al. 2018, eq. 17) or the
    non-saturating E[softplus(-D(x_hat))] = -E[log sigmoid D(x_hat)] (Goodfellow et al. 2014, Sec. 3)."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_LOSSES}")


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, delta: float = 1e-4) -> torch.Tensor:
    """||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), clamped to [0, max_weight], detached
    (Esser et al. 2021, eq. 7; delta = 1e-4 as in their code). Keeps both graphs for the backward pass."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.float().norm() / (g_gan.float().norm() + delta)
    return weight.clamp(0.0, max_weight).detach()
