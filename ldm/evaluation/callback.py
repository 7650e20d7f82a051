"""A Lightning callback that tracks FD in CLIP space (and shapes prompt adherence) while a denoiser trains.

Every ``every_n_validations`` validation runs it generates one image per caption of a small fixed set (the
first ``n`` samples of ``data_dir/split``) with the module's ``pipeline()`` (``LatentDiffusion.pipeline``:
EMA weights) and logs ``val/fd_clip`` (Heusel et al. 2017, eq. 6, on the project's CLIP image features)
and, with a shapes probe, ``val/adherence_{color,shape,position,all_three}``.

Under DDP, rank r of W takes samples r, r + W, …; the statistics live in torchmetrics states whose
``compute()`` sums them over ranks (FD: feature sums and outer products; adherence: weighted means), so every
rank logs the value of the whole set. Each rank seeds its noise with ``seed + 7919·rank``: the generated
set, and so the value, depends on the world size, but not on anything else.

YAML (LightningCLI)::

    trainer:
      callbacks:
        - class_path: ldm.evaluation.callback.FDCallback
          init_args: {data_dir: datasets/shapes, image_encoder: checkpoints/shapes/parts/text_encoder/image_encoder,
                      probe: checkpoints/shapes/parts/probe, n: 200, every_n_validations: 5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.data.shards import list_shards
from ldm.evaluation.fid import CLIPImageFeatures, RealSplit, load_split, to_uint8
from ldm.evaluation.sweep import ADHERENCE_KEYS, caption_adherence
from ldm.pipeline import TextToImagePipeline


class FDCallback(pl.Callback):
    """FD in CLIP space (+ shapes adherence with ``probe``) of the module's pipeline on a fixed caption set.

    Args:
        data_dir / split / n: the fixed set: the first ``n`` samples of the split (real images + captions).
        image_encoder: exported CLIP image tower (``make train-clip`` writes ``parts/text_encoder/image_encoder``).
        probe: exported shapes probe (``ldm adherence`` trains one), or None for no adherence.
        every_n_validations: evaluate on every N-th validation run (sanity checks are not counted).
        steps / guidance / sampler / seed / batch_size: how the images are sampled.
        prefix: logged names are ``{prefix}fd_clip`` and ``{prefix}adherence_*``.
    """

    def __init__(self, data_dir: str, image_encoder: str, probe: str | None = None,
                 n: int = 100, every_n_validations: int = 1, split: str = "val", steps: int = 10,
                 guidance: float = 4.0, sampler: str = "dpmpp-2m", seed: int = 0, batch_size: int = 100,
                 prefix: str = "val/") -> None:
        super().__init__()
        if n < 2 or every_n_validations < 1:
            raise ValueError(f"FDCallback needs n >= 2 and every_n_validations >= 1, got {n} and {every_n_validations}")
        self.data_dir, self.split, self.n = data_dir, split, n
        self.every = every_n_validations
        self.sampling = {"steps": steps, "guidance": guidance, "sampler": sampler}
        self.seed, self.batch_size, self.prefix = seed, batch_size, prefix
        self.fd = FrechetInceptionDistance(feature=CLIPImageFeatures.from_part(image_encoder),
                                           reset_real_features=False)
        self.probe = None
        if probe is not None:
            from ldm.evaluation.shapes_probe import load_probe

            if not (Path(probe) / "model.safetensors").is_file():
                raise FileNotFoundError(f"FDCallback probe {probe} does not exist: train one with `ldm adherence` "
                                        "(it saves the probe there) or set probe: null")
            self.probe = load_probe(probe)
        self.adherence = torch.nn.ModuleDict({k: MeanMetric() for k in ADHERENCE_KEYS})
        self.real: RealSplit | None = None
        self.runs = 0
        self.history: list[tuple[int, dict[str, float]]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "pipeline", None)):
            raise TypeError(f"FDCallback needs a module with pipeline() -> TextToImagePipeline "
                            f"(LatentDiffusion); {type(pl_module).__name__} has none")
        list_shards(self.data_dir, self.split)  # a missing dataset fails now, not after the first epoch

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.runs += 1
        if self.runs % self.every:
            return
        pipe = pl_module.pipeline()
        values = self.evaluate(pipe, trainer.global_rank, trainer.world_size)
        for key, value in values.items():
            pl_module.log(self.prefix + key, value, on_step=False, on_epoch=True, batch_size=1)
        self.history.append((trainer.global_step, values))

    @torch.no_grad()
    def evaluate(self, pipe: TextToImagePipeline, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """This rank's share of the set → synced ``fd_clip`` (and ``adherence_*``) over all ranks."""
        if self.n < 2 * world_size:
            raise ValueError(f"FDCallback n={self.n} is too small for {world_size} ranks (each needs 2 samples)")
        device = pipe.device
        self.fd.to(device)
        if self.real is None:
            self.real = load_split(self.data_dir, self.split, self.n, pipe.config.height)
            self.fd.update(self.real.images[rank::world_size].to(device), real=True)
        self.fd.reset()  # generated statistics only: reset_real_features=False keeps the real ones
        images = self.generate(pipe, rank, world_size)
        self.fd.update(images.to(device), real=False)
        values = {"fd_clip": float(self.fd.compute())}
        if self.probe is not None:
            self.probe.to(device)
            scores = caption_adherence(self.probe, images, self.real.metas[rank::world_size])
            for key, metric in self.adherence.items():
                metric.to(device).reset()
                if scores["adherence_n"]:
                    metric.update(torch.tensor(scores[key], device=device, dtype=torch.float64),
                                  weight=float(scores["adherence_n"]))
            values.update({f"adherence_{k}": float(m.compute()) for k, m in self.adherence.items()})
        return values

    def generate(self, pipe: TextToImagePipeline, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """uint8 images for this rank's captions (samples rank, rank + W, …), noise seed ``seed + 7919·rank``."""
        assert self.real is not None
        prompts = self.real.captions[rank::world_size]
        images = pipe.generate(prompts, seed=self.seed + 7919 * rank, batch_size=self.batch_size, progress=False,
                               **self.sampling)
        return to_uint8(images)

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
