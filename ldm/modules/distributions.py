"""The VAE posterior q(z|x): a Gaussian with diagonal covariance over every latent element.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2014): the encoder outputs the mean and the
log-variance of q(z|x) = N(mu, diag(sigma^2)); samples are drawn with the reparameterization
z = mu + sigma * eps (eq. 10 / Sec. 2.4) and the KL to the prior N(0, I) has the closed form of
appendix B. Latent Diffusion (Rombach et al. 2022, Sec. 3 and appendix G) uses exactly this with a
tiny KL weight ("KL-reg").
"""

from __future__ import annotations

import math

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over tensors shaped (B, C, H, W); logvar is clamped to [-30, 20].

    ``logvar=None`` gives a deterministic posterior (variance 0, KL 0): what a ``double_z=False``
    encoder produces.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None = None) -> None:
        self.mean = mean
        self.deterministic = logvar is None
        if logvar is None:
            logvar = torch.full_like(mean, LOGVAR_MIN)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.zeros_like(mean) if self.deterministic else torch.exp(0.5 * self.logvar)
        self.var = self.std * self.std

    @classmethod
    def from_parameters(cls, parameters: torch.Tensor) -> "DiagonalGaussian":
        """Split an encoder output (B, 2C, H, W) along channels into mean and logvar."""
        if parameters.shape[1] % 2:
            raise ValueError(f"expected an even channel count (mean, logvar), got {parameters.shape[1]}")
        mean, logvar = parameters.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized sample z = mean + std * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W, one value per sample, shape (B,).

        Against the prior N(0, I) (``other=None``): 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)
        (Kingma & Welling 2014, appendix B). Between two diagonal Gaussians:
        0.5 * sum((mu1 - mu2)^2 / s2^2 + s1^2 / s2^2 - 1 - log s1^2 + log s2^2).
        """
        dims = tuple(range(1, self.mean.dim()))
        dtype = torch.promote_types(self.mean.dtype, torch.float32)  # a bf16 sum over C·H·W would round it
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=dtype)
        mean, var, logvar = self.mean.to(dtype), self.var.to(dtype), self.logvar.to(dtype)
        if other is None:
            return 0.5 * (mean.pow(2) + var - 1.0 - logvar).sum(dims)
        return 0.5 * ((mean - other.mean.to(dtype)).pow(2) / other.var.to(dtype) + var / other.var.to(dtype)
                      - 1.0 - logvar + other.logvar.to(dtype)).sum(dims)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z) summed over C, H, W, shape (B,): 0.5 * sum(log 2pi + logvar + (z - mu)^2 / var)."""
        if self.deterministic:
            raise ValueError("the NLL of a deterministic posterior (double_z=False) is undefined")
        dims = tuple(range(1, self.mean.dim()))
        return 0.5 * (math.log(2.0 * math.pi) + self.logvar + (z - self.mean).pow(2) / self.var).sum(dims)
