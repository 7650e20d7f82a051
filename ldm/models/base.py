"""The one training base of every ldm LightningModule: optimizer + LR schedule, EMA, image logging,
skipped-sample logging, checkpoint provenance and export.

Every part's module (VAE, text encoder, denoiser, and what comes next) subclasses :class:`PartModule` and
gets, from the same config shape in every YAML::

    optimizer:   {lr, betas, weight_decay, eps}                 # AdamW (Loshchilov & Hutter 2019)
    lr_schedule: {warmup_steps, decay, min_lr_ratio, decay_steps}

linear warm-up then cosine decay to ``lr · min_lr_ratio`` over the run's live plan (``decay: cosine``, SGDR
eq. 5 without restarts, see ``ldm.training.budget``) or a constant LR (``decay: constant``). Weight decay
skips gains, biases and embeddings (as open_clip and nanoGPT do). The fused AdamW kernel is used wherever the
parameters live on CPU or CUDA (one kernel per step; ~2.5-9x faster than foreach on CPU here).

A checkpoint written by a PartModule records its class and its datamodule's class and init args by their
registered names (``ldm.registry``), so ``ldm export --ckpt PATH`` rebuilds both from the file alone, and
nothing in the file can choose another callable.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from ldm.dist import rank_zero_write
from ldm.io import config_from_dict
from ldm.modules.ema import EMA
from ldm.training.budget import planned_steps, warmup_cosine

CLASS_KEY = "ldm_class_path"
DATAMODULE_KEY = "ldm_datamodule"
LR_DECAYS = ("cosine", "constant")


@dataclass
class OptimizerConfig:
    """AdamW settings (the ``optimizer:`` block of every model config)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.lr <= 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas) or self.weight_decay < 0:
            raise ValueError(f"optimizer: need lr > 0, two betas in [0, 1) and weight_decay >= 0, got {self}")


@dataclass
class LRScheduleConfig:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` or a constant LR (the ``lr_schedule:`` block).

    ``decay_steps``: the length of the decay; None follows the run's live plan (``trainer.max_steps``, which
    ``FitToTimeBudget`` lowers to fit ``max_time``), so the schedule always ends with the run.
    """

    warmup_steps: int = 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        if self.decay not in LR_DECAYS:
            raise ValueError(f"lr_schedule.decay must be one of {LR_DECAYS}, got {self.decay!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"lr_schedule: need warmup_steps >= 0 and min_lr_ratio in [0, 1], got {self}")


def class_path(obj: Any) -> str:
    """``module.Class`` of an object: what a checkpoint records (read back through ``ldm.registry`` only)."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def local_log_dir(trainer: pl.Trainer) -> Path:
    """The run's log folder, found on this rank alone.

    ``trainer.log_dir`` broadcasts from rank 0, so calling it from a rank-0-only code path (sample grids,
    image logging) makes DDP wait forever; this reads the first logger's folder instead.
    """
    if trainer.loggers:
        folder = getattr(trainer.loggers[0], "log_dir", None) or getattr(trainer.loggers[0], "save_dir", None)
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and temperatures are not decayed (open_clip, nanoGPT)."""
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name


class PartModule(pl.LightningModule, abc.ABC):
    """A LightningModule that trains one exportable part (see the module docstring).

    Subclasses call ``super().__init__(optimizer, lr_schedule)`` with their own defaults merged in, and
    implement :meth:`exporter`. The default :meth:`configure_optimizers` trains :meth:`trainable_parameters`
    with one AdamW and the configured schedule; a module with several optimizers (the VAE's GAN) builds each
    with :meth:`make_optimizer` and :meth:`make_scheduler`.
    """

    default_optimizer: dict[str, Any] = {}
    default_lr_schedule: dict[str, Any] = {}
    # state-dict prefixes of frozen parts (a VAE, a text encoder, a teacher): exported parts with files of their
    # own, kept out of checkpoints and taken from the module itself when a checkpoint is loaded
    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, optimizer: dict[str, Any] | None = None, lr_schedule: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.optimizer_config = config_from_dict(OptimizerConfig, {**self.default_optimizer, **(optimizer or {})},
                                                 "model.optimizer")
        self.lr_schedule_config = config_from_dict(LRScheduleConfig,
                                                   {**self.default_lr_schedule, **(lr_schedule or {})},
                                                   "model.lr_schedule")
        self.ema: EMA | None = None
        self._ema_source: nn.Module | None = None

    # ---- optimizer + LR schedule -------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs the default optimizer trains: every parameter that requires a gradient."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def make_optimizer(self, named_params: Iterable[tuple[str, nn.Parameter]], lr: float | None = None
                       ) -> torch.optim.AdamW:
        """AdamW over ``named_params`` with the configured settings (no decay on gains/biases/embeddings)."""
        cfg = self.optimizer_config
        decay, plain = [], []
        for name, p in named_params:
            (plain if no_weight_decay(name, p) else decay).append(p)
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision: foreach there
        mixed = self._trainer is not None and "mixed" in str(self._trainer.precision)
        fused = not mixed and all(p.device.type in ("cpu", "cuda") for p in decay + plain)
        if cfg.weight_decay == 0:  # one group: nothing to split
            groups = [{"params": decay + plain, "weight_decay": 0.0}]
        else:
            groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": plain, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)

    def planned_steps(self) -> float:
        """Optimizer steps of the run as planned now (what a cosine decays over when decay_steps is None)."""
        return planned_steps(self._trainer)

    def lr_factor(self, step: int) -> float:
        """The LR multiplier after ``step`` steps: warm-up, then cosine to ``min_lr_ratio`` or constant."""
        cfg = self.lr_schedule_config
        total = None if cfg.decay == "constant" else (cfg.decay_steps or self.planned_steps())
        return warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, offset: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
        """The configured schedule on ``optimizer``; the plan is read at every step (it may change)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step + offset))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer(self.trainable_parameters())
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.make_scheduler(optimizer), "interval": "step"}}

    # ---- sharding (ldm.training.sharded.ShardedStrategy: FSDP2) ------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether the parameters are split over the ranks (FSDP2): gathering them is then a collective."""
        return getattr(self, "_sharded", False)

    def shard_roots(self) -> list[nn.Module]:
        """The submodules a sharded strategy wraps: the EMA-tracked module, else every child with trainable
        parameters (a LightningModule itself is never wrapped)."""
        if self._ema_source is not None:
            return [self._ema_source]
        return [m for m in self.children() if any(p.requires_grad for p in m.parameters())
                and m is not self.ema]

    def configure_model(self) -> None:
        """Shard the model when the strategy shards (``ShardedStrategy.shard``); nothing otherwise."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "shard") and not self.sharded:
            strategy.shard(self)

    def after_sharding(self) -> None:
        """Rebuild the EMA from the sharded parameters: every shadow tensor then holds this rank's slice."""
        self._sharded = True
        if self.ema is not None:
            self.ema = EMA(self._ema_source, self.ema.decay)

    # ---- EMA -----------------------------------------------------------------------------------------
    def track_ema(self, module: nn.Module, decay: float | None) -> None:
        """Keep an EMA of ``module``'s weights, updated after every optimizer step (None: no EMA)."""
        self._ema_source = module if decay is not None else None
        self.ema = EMA(module, decay) if decay is not None else None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self._ema_source)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Run the tracked module with its EMA weights inside the block (as is, without an EMA)."""
        if self.ema is None:
            yield
            return
        with self.ema.swapped_into(self._ema_source):
            yield

    # ---- logging -------------------------------------------------------------------------------------
    def log_image(self, tag: str, image: Image.Image, step: int | None = None) -> Path | None:
        """An image to every logger that takes images (TensorBoard) and as a PNG in ``<log dir>/images/``.

        Call it on one rank (rank 0); returns the PNG path (None without a trainer).
        """
        step = self.global_step if step is None else step
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if self._trainer is None:
            return None
        path = local_log_dir(self.trainer) / "images" / f"{tag.replace('/', '_')}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._log_skipped(batch, "train")

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log_skipped(batch, "val")

    def _log_skipped(self, batch: Any, split: str) -> None:
        if isinstance(batch, dict) and "skipped" in batch and self._trainer is not None:
            from ldm.data.webdata import log_skipped

            log_skipped(self, batch, split)

    def on_train_epoch_end(self) -> None:
        from ldm.data.webdata import log_skip_reasons

        log_skip_reasons(self, "train")  # per reason, once an epoch (every rank: one all-reduce)

    def on_validation_epoch_end(self) -> None:
        """Subclasses that override this call ``super().on_validation_epoch_end()`` (every rank must)."""
        from ldm.data.webdata import log_skip_reasons

        log_skip_reasons(self, "val")

    # ---- the validation sample grid (modules that draw samples set val_prompts and sample_every_n_val) ----
    val_prompts: list[str] | None = None
    _val_runs = 0

    def sample_prompts(self) -> list[str]:
        """The validation grid's prompts: ``val_prompts``, else the training dataset's own (or none)."""
        if self.val_prompts is not None:
            return self.val_prompts
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        benchmark = getattr(dm, "benchmark", None)
        return list(benchmark.val_prompts()) if benchmark is not None else []

    def wants_samples(self) -> bool:
        """Count a validation run; True on every ``sample_every_n_val``-th one when there are prompts to draw."""
        self._val_runs += 1
        every = self.hparams.get("sample_every_n_val", 0)
        return bool(every and self._val_runs % every == 0 and self.sample_prompts())

    # ---- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = class_path(self)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            checkpoint[DATAMODULE_KEY] = {"class_path": class_path(dm), "init_args": dict(dm.hparams)}
        if self.frozen_prefixes:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(self.frozen_prefixes)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """The frozen parts (``frozen_prefixes``) come from the module itself, everything else from ``state_dict``."""
        if self.frozen_prefixes:
            own = super().state_dict()
            state_dict = {**{k: v for k, v in own.items() if k.startswith(self.frozen_prefixes)}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- export ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def exporter(self, datamodule: pl.LightningDataModule | None) -> Callable[[Path], None]:
        """Prepare the export on every rank (measurements may be collective); return the writer rank 0 runs."""

    def export(self, out_dir: str | Path, datamodule: pl.LightningDataModule | None = None) -> Path:
        """Write the trained part(s) to ``out_dir`` (config.json + model.safetensors per part, see ``ldm.io``).

        Under DDP every rank calls it: each prepares (:meth:`exporter`), rank 0 writes, the others wait.
        """
        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
        write = self.exporter(datamodule)
        out = Path(out_dir)
        rank_zero_write(lambda: write(out))
        return out

