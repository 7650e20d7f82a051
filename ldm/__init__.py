"""ldm: latent diffusion you can train (VAE, CLIP text conditioner, cross-attention U-Net)."""

__version__ = "0.1.0"
