"""Progressive training: continue a run at another resolution (32 → 64 → 128) as a new fit.

Lightning's own resume (``--ckpt_path``) restores a run exactly, data position and all, so it refuses nothing but
also changes nothing. A new *stage* is a new fit over other data (a higher resolution, another cache) that starts
from the last stage's state: :class:`ContinueFrom` (``ldm fit --continue-from CKPT``) loads, at the start of the
fit, every tensor of the checkpoint whose shape still fits (weights, EMA), the optimizer state of those parameters,
the LR schedulers' step and the global step, so step counts, the LR schedule (its cosine over the whole planned
run) and the EMA warm-up all go on where the last stage stopped. Tensors whose shape changed with the resolution
(a learned position table, say) keep their fresh initialisation and lose their optimizer state; they are listed.
The loaded file is read weights-only (``ldm.io.load_checkpoint``).

``trainer.max_steps`` counts the whole run: a stage that continues a 3,000-step run for 2,000 more steps sets 5,000.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.errors import UsageError
from ldm.io import load_checkpoint


def matching_state(current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(``current`` with every same-shaped tensor of ``saved`` put in, names whose shape differs, names ``saved``
    lacks)."""
    merged, changed, missing = dict(current), [], []
    for name, value in current.items():
        if name not in saved:
            missing.append(name)
        elif tuple(saved[name].shape) != tuple(value.shape):
            changed.append(name)
        else:
            merged[name] = saved[name].to(dtype=value.dtype)
    return merged, changed, missing


def _optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> int:
    """Load ``saved`` (an optimizer ``state_dict``) into ``optimizer`` for the parameters whose state tensors have
    their shape; the hyper-parameters (lr, betas, ...) stay this run's. Returns how many parameters were loaded."""
    current = optimizer.state_dict()
    shapes = [[tuple(p.shape) for p in group["params"]] for group in optimizer.param_groups]
    if [len(g["params"]) for g in current["param_groups"]] != [len(g["params"]) for g in saved["param_groups"]]:
        return 0
    index_shape = {i: s for group, group_shapes in zip(current["param_groups"], shapes)
                   for i, s in zip(group["params"], group_shapes)}
    remap = {old: new for g_old, g_new in zip(saved["param_groups"], current["param_groups"])
             for old, new in zip(g_old["params"], g_new["params"])}
    state = {}
    for old, entry in saved["state"].items():
        new = remap.get(old)
        if new is None:
            continue
        tensors = [v for v in entry.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
        if all(tuple(v.shape) == index_shape[new] for v in tensors):
            state[new] = entry
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    return len(state)


def set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Make the trainer count optimizer steps from ``step`` (automatic and manual optimization alike)."""
    loop = trainer.fit_loop.epoch_loop
    for progress in (loop.automatic_optimization.optim_progress.optimizer.step.total,
                     loop.manual_optimization.optim_step_progress.total):
        progress.ready = progress.completed = step
    loop._batches_that_stepped = step


class ContinueFrom(Callback):
    """Start the fit from ``ckpt_path``'s weights, optimizer state, LR-schedule step and global step (see the
    module docstring). A fit resumed with ``--ckpt_path`` (its own checkpoint) ignores this.

    Args:
        ckpt_path: a checkpoint of the previous stage (``last.ckpt``).
    """

    def __init__(self, ckpt_path: str) -> None:
        self.ckpt_path = str(ckpt_path)
        self.report: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            self.report = {"skipped": f"resuming {trainer.ckpt_path} itself"}
            return
        if not Path(self.ckpt_path).is_file():
            raise UsageError(f"--continue-from {self.ckpt_path}: no such checkpoint file")
        checkpoint = load_checkpoint(self.ckpt_path, require=("state_dict",))
        step = int(checkpoint.get("global_step", 0))
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= step:
            raise UsageError(f"--continue-from {self.ckpt_path} is at step {step} but trainer.max_steps is "
                             f"{trainer.max_steps}: max_steps counts the whole run (e.g. {step + 1000})")
        hook = getattr(pl_module, "on_load_checkpoint", None)
        if hook is not None:
            hook(checkpoint)  # provenance checks (the LDM's frozen parts)
        merged, changed, missing = matching_state(pl_module.state_dict(), checkpoint["state_dict"])
        pl_module.load_state_dict(merged)
        loaded = [_optimizer_state(opt, saved)
                  for opt, saved in zip(trainer.optimizers, checkpoint.get("optimizer_states", []))]
        for config, saved in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
            scheduler = config.scheduler
            scheduler.last_epoch = int(saved.get("last_epoch", step))
            if hasattr(scheduler, "lr_lambdas"):
                for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * fn(scheduler.last_epoch)
        set_global_step(trainer, step)
        self.report = {"step": step, "reinitialised": changed, "not_in_checkpoint": missing,
                       "optimizer_params_loaded": loaded}
        if changed or missing:
            warnings.warn(f"--continue-from {self.ckpt_path}: kept the fresh initialisation of "
                          f"{len(changed)} tensor(s) whose shape changed "
                          f"({', '.join(changed[:6])}{' …' if len(changed) > 6 else ''}) and "
                          f"{len(missing)} the checkpoint lacks", UserWarning, stacklevel=2)
        if trainer.is_global_zero:
            print(f"continuing {self.ckpt_path} from step {step}: {len(merged) - len(changed) - len(missing)} tensors "
                  f"loaded, optimizer state of {sum(loaded)} parameters", flush=True)
