"""What a VAE keeps: does the shapes probe read the same colour, shape and position from a
reconstruction as from the original image?

The VAE bounds everything downstream of it (Rombach et al. 2022, Sec. 3.1: the denoiser only ever sees
z = E(x), and every sample is D(z)): an attribute the reconstruction D(E(x)) loses cannot be generated
either. PSNR and SSIM (Wang et al. 2004, eq. 13) say how close the pixels are; the probe says whether the
*content* survived. The comparison is against the probe's reading of the original, not the label, so a
probe error on the original does not count against the VAE.

``ldm vae-fidelity --vae PART_OR_CKPT --probe checkpoints/shapes/parts/probe``.
Imports neither Lightning nor webdataset.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from ldm.evaluation.shapes_probe import ATTRIBUTES, ShapesProbe, adherence, load_labelled, to_unit
from ldm.io import PartError, load_checkpoint, load_part, load_state_dict_checked
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig


def load_vae(path: str | Path) -> AutoencoderKL:
    """An :class:`AutoencoderKL` in eval mode from an exported part folder or from a training ``.ckpt``
    of ``ldm.models.autoencoder.AutoencoderModule`` (weights under ``vae.``, geometry in its ``vae``
    hyper-parameter; loaded with ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        return load_part(path, AutoencoderKL)
    ckpt = load_checkpoint(path)
    geometry = ckpt.get("hyper_parameters", {}).get("vae")
    if not isinstance(geometry, dict):
        raise PartError(f"{path} has no `vae` hyper-parameter: is it a checkpoint of AutoencoderModule "
                        "(ldm fit --config configs/vae/...)? Or pass an exported part folder")
    vae = AutoencoderKL(AutoencoderKLConfig(**geometry))
    state = {k[len("vae."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    load_state_dict_checked(vae, state, str(path))
    return vae.eval()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """x_hat = D(mode of q(z|x)) for [-1, 1] images (Rombach et al. 2022, Sec. 3.1), clamped to [-1, 1]."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    out = [vae.decode(vae.encode(chunk.to(device)).mode()).float().clamp(-1, 1).cpu()
           for chunk in images.split(batch_size)]
    vae.train(was_training)
    return torch.cat(out)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images mapped to [0, 1]: 10 log10(1 / MSE) (data range 1)."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def reconstruction_fidelity(vae: AutoencoderKL, probe: ShapesProbe, data_dir: str | Path, n: int | None = None,
                            split: str = "val", batch_size: int = 250) -> dict[str, Any]:
    """How much of the single-object images of ``data_dir/split`` (the first ``n``; None: all) the VAE keeps.

    Returns ``kept`` (fraction whose reconstruction the probe reads with the same colour, shape and
    position as the original), ``kept_<attribute>`` for each of the five attributes, the probe's accuracy
    against the labels on originals and reconstructions (``probe_originals`` / ``probe_reconstructions``,
    colour+shape+position), mean ``psnr`` (dB) and ``ssim`` (Wang et al. 2004, eq. 13; Gaussian window
    11, sigma 1.5) over the same images, ``n`` and ``seconds``.
    """
    start = time.perf_counter()
    images, labels = load_labelled(data_dir, split, n, probe.config.resolution)
    x = to_unit(images)
    recon = reconstruct(vae, x, batch_size)
    read_original, read_recon = probe.predict(x, batch_size), probe.predict(recon, batch_size)
    kept = adherence(read_recon, read_original)
    result: dict[str, Any] = {"n": len(labels), "kept": kept["all_three"]}
    result.update({f"kept_{a}": kept[a] for a in ATTRIBUTES})
    result["probe_originals"] = adherence(read_original, labels)["all_three"]
    result["probe_reconstructions"] = adherence(read_recon, labels)["all_three"]
    result["psnr"] = psnr(recon, x).mean().item()
    result["ssim"] = structural_similarity_index_measure((recon + 1) / 2, (x + 1) / 2, data_range=1.0).item()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
