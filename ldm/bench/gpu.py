"""``ldm bench gpu`` (``make gpu-check``): is this GPU machine ready to train ldm at Stable Diffusion scale?

Trains each part for a few hundred steps at an SD-like size in bf16 with DDP on every visible GPU (or one),
then samples, and writes one JSON file (plus the sample grid):

* ``vae``: the KL-f8 VAE of ``configs/vae/kl-f8.yaml`` (83.7 M parameters) on 256-px images;
* ``clip``: a CLIP of SD 1.x text-tower size (77 tokens, 768 wide, 12 layers) with a ViT-B/16 image tower at 224 px;
* ``ldm``: the SD 1.5 U-Net of ``configs/ldm/sd15.yaml`` (860 M parameters) on the 32×32×4 latents of those
  256-px images, conditioned on the text encoder just trained (both encoders run in the step, no cache);
* ``sample``: the LDM's EMA pipeline, 20 DPM-Solver++ steps, guidance 4.

For each part: optimizer steps, images per second over all GPUs (timed after ``warmup`` steps, CUDA synchronised),
seconds per step, the peak GPU memory of the busiest rank, the parameter count and the first/last loss. The data
are procedural shapes rendered at 256 px into ``OUT_DIR/data`` (no download). ``size="tiny"`` runs the same
sequence with tiny models on whatever device there is (the CPU test of this script).

Every DDP rank runs this whole script (Lightning starts ranks 1.. by re-running the command line); rank 0 writes.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

SIZES: dict[str, dict[str, Any]] = {
    "sd": {
        "image": 256, "clip_image": 224, "batch": {"vae": 8, "clip": 64, "ldm": 16},
        "vae": dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], mid_attention=True,
                    resolution=256, z_channels=4, norm_groups=32),
        "text": dict(context_length=77, width=768, heads=12, layers=12, embed_dim=768),
        "image_tower": dict(tower="vit", image_size=224, patch_size=16, width=768, heads=12, layers=12, embed_dim=768),
        "unet": dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
                     num_heads=8, head_dim=None, num_groups=32),
    },
    "tiny": {
        "image": 32, "clip_image": 32, "batch": {"vae": 4, "clip": 8, "ldm": 4},
        "vae": dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], mid_attention=False, resolution=32,
                    z_channels=4, norm_groups=4),
        "text": dict(context_length=16, width=32, heads=2, layers=1, embed_dim=32),
        "image_tower": dict(tower="conv", image_size=32, width=16, layers=2, embed_dim=32),
        "unet": dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                     num_heads=2, head_dim=None, num_groups=8),
    },
}
PROMPTS = ["a large red circle on the left", "a small blue square in the top right", "a green star",
           "a yellow triangle at the bottom"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter(Callback):
    """Images per second after ``warmup`` optimizer steps (all ranks), peak memory, first and last loss."""

    def __init__(self, batch: int, warmup: int) -> None:
        self.batch, self.warmup = batch, warmup
        self.start: float | None = None
        self.start_step = 0
        self.losses: list[float] = []
        self.result: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.start is None and trainer.global_step >= self.warmup:
            _sync(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           i: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # manual optimization (the VAE): the logged training loss
            loss = next((v for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k),
                        None)
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach().float()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        _sync(device)
        steps = trainer.global_step - self.start_step
        seconds = time.perf_counter() - self.start if self.start is not None else float("nan")
        peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0,
                            device=device)
        peak = trainer.strategy.reduce(peak, reduce_op="max") if trainer.world_size > 1 else peak
        images = steps * self.batch * trainer.world_size
        self.result = {"steps": trainer.global_step, "timed_steps": steps, "batch_per_device": self.batch,
                       "devices": trainer.world_size, "seconds": round(seconds, 3),
                       "img_per_s": round(images / seconds, 2) if steps > 0 else None,
                       "s_per_step": round(seconds / steps, 4) if steps > 0 else None,
                       "peak_memory_gib": round(float(peak) / 2**30, 3),
                       "loss_first": self.losses[0] if self.losses else None,
                       "loss_last": self.losses[-1] if self.losses else None}


def _trainer(root: Path, steps: int, meter: Meter, accelerator: str, devices: int | str, precision: str,
             strategy: str) -> pl.Trainer:
    return pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                      max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(root), callbacks=[meter], benchmark=accelerator != "cpu")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gpu_check(out_dir: str | Path, steps: int = 300, warmup: int = 20, size: str = "sd", accelerator: str = "gpu",
              devices: int | str = -1, precision: str = "bf16-mixed", parts: tuple[str, ...] = ("vae", "clip", "ldm"),
              sample_steps: int = 20) -> dict[str, Any]:
    """Run the check (module docstring); returns the result dict (on every rank; rank 0's is the one to write)."""
    from ldm.data.shapes import build_shapes
    from ldm.data.webdata import WebDataModule
    from ldm.models.autoencoder import AutoencoderModule
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.models.text_encoder import ContrastiveCLIP
    from ldm.visual import image_grid

    spec = SIZES[size]
    out = Path(out_dir)
    data = out / "data"
    n_train = max(64, 2 * max(spec["batch"].values()) * 8)
    if not (data / "info.json").is_file() and os.environ.get("LOCAL_RANK", "0") == "0":
        build_shapes(data, train=n_train, val=16, size=spec["image"], seed=0, shard_size=256)
    multi = devices not in (1, "1") and not (accelerator == "cpu" and devices in (-1, "-1", "auto"))
    strategy = "ddp" if multi else "auto"
    result: dict[str, Any] = {"size": size, "precision": precision, "torch": torch.__version__,
                              "lightning": pl.__version__, "python": platform.python_version(),
                              "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                         else platform.processor() or "cpu"),
                              "parts": {}}
    warnings.filterwarnings("ignore", category=UserWarning)

    def fit(name: str, model: pl.LightningModule, resolution: int) -> pl.LightningModule:
        batch = spec["batch"][name]
        dm = WebDataModule(str(data), resolution=resolution, batch_size=batch, num_workers=2, shuffle_buffer=256,
                           samples_per_epoch=n_train, val_split=None)
        meter = Meter(batch, min(warmup, max(0, steps - 2)))
        trainer = _trainer(out / name, steps, meter, accelerator, devices, precision, strategy)
        trainer.fit(model, datamodule=dm)
        result["parts"][name] = {**meter.result, "params": _params(model)}
        model.export(out / "parts" / name, datamodule=dm)
        return model

    torch.manual_seed(0)
    if "vae" in parts:
        fit("vae", AutoencoderModule(vae=spec["vae"], optimizer={"lr": 1e-4}, lr_schedule={"warmup_steps": 10},
                                     disc_start=None, l1_weight=1.0, l2_weight=0.0, image_every_n_steps=10**9,
                                     export_batches=2), spec["image"])
    if "clip" in parts:
        fit("clip", ContrastiveCLIP(text=spec["text"], image=spec["image_tower"], optimizer={"lr": 5e-4},
                                    lr_schedule={"warmup_steps": 10}, zero_shot=False), spec["clip_image"])
    if "ldm" in parts:
        model = fit("ldm", LatentDiffusion(vae_path=str(out / "parts" / "vae"),
                                           text_encoder_path=str(out / "parts" / "clip"), denoiser=spec["unet"],
                                           resolution=spec["image"], optimizer={"lr": 1e-4},
                                           lr_schedule={"warmup_steps": 10}, sample_every_n_val=0), spec["image"])
        pipe = model.pipeline()  # every rank (a sharded strategy would gather here); rank 0 samples
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            device = model.device
            pipe.to(device)
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
                images = pipe(PROMPTS, steps=sample_steps, n_per_prompt=2, seed=0, progress=False)
            _sync(device)
            seconds = time.perf_counter() - start
            grid = out / "samples.png"
            image_grid(images, rows=len(PROMPTS), scale=1).save(grid)
            result["sample"] = {"images": len(images), "steps": sample_steps, "seconds": round(seconds, 3),
                                "img_per_s": round(len(images) / seconds, 3), "grid": str(grid)}
    return result


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The per-part figures as a table (``ldm.table``)."""
    from ldm.table import format_table as table

    rows = [{"part": name, **r} for name, r in result["parts"].items()]
    columns = [("part", "part", ""), ("params", "params", ","), ("devices", "GPUs", ""),
               ("batch_per_device", "batch/GPU", ""), ("steps", "steps", ""), ("img_per_s", "img/s", ".1f"),
               ("s_per_step", "s/step", ".3f"), ("peak_memory_gib", "peak GiB", ".2f"),
               ("loss_first", "loss first", ".4f"), ("loss_last", "loss last", ".4f")]
    text = table(rows, columns, markdown)
    sample = result.get("sample")
    if sample:
        text += (f"\nsampling: {sample['images']} images, {sample['steps']} steps in {sample['seconds']} s "
                 f"({sample['img_per_s']} img/s); grid {sample['grid']}")
    return f"{result['device']} ({result['precision']}, torch {result['torch']})\n{text}"
