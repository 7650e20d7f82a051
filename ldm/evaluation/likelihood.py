"""Bits/dim of a pipeline on real images: the variational bound (ELBO) and the probability-flow ODE likelihood.

Pixel-space pipelines (``IdentityFirstStage``): the bound is ``likelihood.variational_bound`` on the 8-bit images
with the discretized decoder, and the ODE value uses uniform dequantization; both are bits/dim of the discrete
data, the quantity DDPM/iDDPM/score-SDE papers report (there on CIFAR-10/ImageNet; here on our data).

Latent pipelines (a KL-VAE): the bound on −log P(x) of the hierarchical model x ← D(z) + noise, z ~ diffusion
prior, is (Kingma & Welling 2014's ELBO with the diffusion bound as −log p(z); Vahdat et al. 2021, LSGM eq. 2)

    −log P(x) ≤ E_{q(z|x)}[ −log p(x | z) ] + E_q[ L_vlb(z) ] − H[q(z|x)],

with p(x | z) a discretized Gaussian of mean D(z) and one scalar σ_dec (the VAE has no likelihood of its own; we
fit σ_dec by maximum likelihood on the evaluated images, which favours the bound slightly), L_vlb(z) the latent
diffusion's bound with a Gaussian L_0 (z is continuous), and H the entropy of the encoder's Gaussian in the
scaled latent coordinates. We report the *latent* bits/dim (L_vlb(z) − H over latent dims: a continuous density
in another space, not comparable to anything in pixels) and the total over pixel dims, which *is* a bound on the
8-bit images' likelihood but is dominated by the decoder term: it measures the autoencoder's reconstruction noise,
not the diffusion model, and is not comparable to pixel-space models' bits/dim in what it says about them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning import Conditioning
from ldm.diffusion.likelihood import (
    LN2,
    discretized_gaussian_log_likelihood,
    mean_and_standard_error,
    variational_bound,
)
from ldm.diffusion.ode_likelihood import ode_bits_per_dim
from ldm.diffusion.samplers import ModelFn
from ldm.pipeline import TextToImagePipeline


@dataclass
class NLLResult:
    """Per-image bits/dim (``values``) and named per-image components, with their means ± standard errors."""

    method: str
    values: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        mean, se = mean_and_standard_error(self.values)
        out: dict[str, Any] = {"method": self.method, "bits_per_dim": mean, "standard_error": se,
                               "n": int(self.values.numel())}
        for name, v in self.parts.items():
            out[name] = mean_and_standard_error(v)[0]
        return {**out, **self.info}


def is_pixel_space(pipe: TextToImagePipeline) -> bool:
    """Whether the pipeline's first stage is the identity (its latents are the 8-bit pixels)."""
    return bool(getattr(pipe.vae, "is_identity", False))


def to_unit(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) → float in [−1, 1] (x / 127.5 − 1, as the shard loader)."""
    return images.float() / 127.5 - 1


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def tiled_model_fn(pipe: TextToImagePipeline, captions: list[str]) -> ModelFn:
    """``pipe.model_fn`` (no guidance: the model's own conditional density) for the captions' B images, also
    for inputs that tile them k times (the bound's timestep chunks, the ODE's Hutchinson probe copies)."""
    cond = pipe.condition(captions)
    fns: dict[int, ModelFn] = {}

    def fn(x: Tensor, t: Tensor) -> Tensor:
        k, rest = divmod(x.shape[0], len(captions))
        if rest or k < 1:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of the {len(captions)} conditioned images")
        if k not in fns:
            fns[k] = pipe.model_fn(Conditioning.cat([cond] * k))
        return fns[k](x, t)

    return fn


@torch.no_grad()
def pilot_proposal(pipe: TextToImagePipeline, images: Tensor, captions: list[str], *, variance: str | None = None,
                   chunk: int = 8, seed: int = 1, floor: float = 0.01) -> Tensor:
    """An importance-sampling proposal over t = 1..T−1 for the bound's KL terms, π(t) ∝ √E[L_t²] (iDDPM §3.3),
    estimated exhaustively on a few pilot ``images``; mixed with ``floor`` of the uniform so no t has π = 0."""
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    x = to_unit(images).to(pipe.device, pipe.dtype)
    z = pipe.vae.encode_latents(x) if is_pixel_space(pipe) else pipe.vae.encode_latents(x, sample=True, generator=gen)
    vlb = variational_bound(tiled_model_fn(pipe, captions), z, pipe.schedule, variance=variance,
                            decoder="discretized" if is_pixel_space(pipe) else "gaussian", generator=gen, chunk=chunk)
    rms = vlb.kl_terms.pow(2).mean(0).sqrt()
    rms = rms / rms.sum()
    return (1 - floor) * rms + floor / rms.numel()


@torch.no_grad()
def elbo_bits_per_dim(pipe: TextToImagePipeline, images: Tensor, captions: list[str], *, timesteps: int | None = 100,
                      variance: str | None = None, batch_size: int = 64, chunk: int = 4, seed: int = 0,
                      decoder_std: float | None = None, proposal: Tensor | None = None) -> NLLResult:
    """The variational bound in bits/dim per image (see the module doc; pixel or latent pipeline). ``timesteps``
    KL terms per image: None = all T−1, K = stratified-uniform, or drawn from ``proposal`` (:func:`pilot_proposal`)."""
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    pixel = is_pixel_space(pipe)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("total", "prior", "kl", "decoder", "latent", "entropy", "recon")}
    recon_sq, latent_draws = [], []
    for s, e in _batches(len(images), batch_size):
        x = to_unit(images[s:e]).to(pipe.device, pipe.dtype)
        model_fn = tiled_model_fn(pipe, captions[s:e])
        if pixel:
            z = pipe.vae.encode_latents(x)
            vlb = variational_bound(model_fn, z, pipe.schedule, variance=variance, decoder="discretized",
                                    timesteps=timesteps, proposal=proposal, generator=gen, chunk=chunk)
            d = vlb.dims * LN2
            rows["total"].append(vlb.total / d)
            for k in ("prior", "kl", "decoder"):
                rows[k].append(getattr(vlb, k) / d)
            continue
        posterior = pipe.vae.encode(x)
        scale = pipe.vae.config.scaling_factor
        z_raw = posterior.sample(gen)
        z = (z_raw - pipe.vae.config.shift_factor) * scale
        vlb = variational_bound(model_fn, z, pipe.schedule, variance=variance, decoder="gaussian",
                                timesteps=timesteps, proposal=proposal, generator=gen, chunk=chunk)
        if posterior.deterministic:
            raise ValueError("the latent bound needs a VAE with a Gaussian posterior (double_z); "
                             "this one is deterministic")
        entropy = (0.5 * (math.log(2 * math.pi * math.e) + posterior.logvar + 2 * math.log(scale))).flatten(1).sum(1)
        recon = pipe.vae.decode(z_raw).clamp(-1, 1)
        recon_sq.append((recon - x).pow(2).flatten(1).double().cpu())
        latent_draws.append((vlb.total.double().cpu(), entropy.double().cpu(), vlb.dims, recon.cpu(), x.cpu()))
    if pixel:
        values = torch.cat(rows["total"])
        parts = {f"{k}_bpd": torch.cat(rows[k]) for k in ("prior", "kl", "decoder")}
        info = {"space": "pixels", "dims": int(images[0].numel() if pipe.vae.config.z_channels == 3
                                               else images[0, 0].numel())}
    else:
        sigma = decoder_std if decoder_std is not None else float(torch.cat(recon_sq).mean().sqrt())
        totals, latents, decoders = [], [], []
        for latent_nats, entropy, latent_dims, recon, x in latent_draws:
            dec = -discretized_gaussian_log_likelihood(x.double(), recon.double(), 2 * math.log(sigma))
            dec = dec.flatten(1).sum(1)
            pixel_dims = x[0].numel()
            latents.append((latent_nats - entropy) / (latent_dims * LN2))
            decoders.append(dec / (pixel_dims * LN2))
            totals.append((latent_nats - entropy + dec) / (pixel_dims * LN2))
        values = torch.cat(totals)
        parts = {"latent_bpd": torch.cat(latents), "decoder_bpd": torch.cat(decoders)}
        info = {"space": "latent", "decoder_std": sigma, "latent_dims": latent_draws[0][2],
                "pixel_dims": int(images[0].numel())}
    info.update(timesteps="all" if timesteps is None else timesteps,
                estimator=("exhaustive" if timesteps is None
                           else "importance" if proposal is not None else "stratified"),
                wall_s=round(time.perf_counter() - start, 1),
                cpu_s=round(time.process_time() - cpu, 1))
    return NLLResult("elbo", values.cpu(), {k: v.cpu() for k, v in parts.items()}, info)


def ode_nll_bits_per_dim(pipe: TextToImagePipeline, images: Tensor, captions: list[str], *, method: str = "rk4",
                         steps: int = 50, rtol: float = 1e-5, atol: float = 1e-5, probes: int = 1,
                         probe: str = "rademacher", batch_size: int = 64, seed: int = 0) -> NLLResult:
    """Dequantized PF-ODE bits/dim per image (pixel pipelines; Song et al. 2021b eq. 39-40)."""
    if not is_pixel_space(pipe):
        raise ValueError("the ODE likelihood of a latent pipeline is a latent density; use a pixel-space pipeline")
    gen = torch.Generator(device=pipe.device).manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    values, nfes = [], []
    for s, e in _batches(len(images), batch_size):
        z = pipe.vae.encode_latents(to_unit(images[s:e]).to(pipe.device, pipe.dtype))
        bpd, result = ode_bits_per_dim(tiled_model_fn(pipe, captions[s:e]), z, pipe.schedule, generator=gen,
                                       method=method, steps=steps, rtol=rtol, atol=atol, probes=probes, probe=probe)
        values.append(bpd.double().cpu())
        nfes.append(result.nfe)
    info = {"space": "pixels", "solver": method, "steps" if method != "dopri5" else "tolerance":
            steps if method != "dopri5" else rtol, "probes": probes, "probe": probe,
            "nfe_mean": sum(nfes) / len(nfes), "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(time.process_time() - cpu, 1)}
    return NLLResult("ode", torch.cat(values), {}, info)
