"""``torch.compile`` for chosen submodules of a LightningModule (the denoiser), switched on from YAML.

    trainer:
      callbacks:
        - class_path: ldm.training.CompileModules
          init_args: {modules: [denoiser], mode: max-autotune-no-cudagraphs}

Submodules are compiled in place with ``nn.Module.compile`` before the strategy wraps the model (so DDP
wraps the compiled module and its gradient hooks still fire per parameter), and their ``state_dict``
keys do not change (no ``_orig_mod.`` prefix): checkpoints and exports stay interchangeable with
uncompiled runs. Off by default: on a 2-core CPU the compile time (tens of seconds) is not paid back by
a short run; measure with ``ldm bench ddp`` before turning it on.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class CompileModules(Callback):
    """Compile ``modules`` (attribute paths on the LightningModule, e.g. ``denoiser``) with ``torch.compile``.

    Args:
        modules: dotted attribute paths of the submodules to compile.
        backend, mode, dynamic, fullgraph: ``torch.compile`` arguments (``backend: aot_eager`` checks tracing
            without generating kernels).
    """

    def __init__(self, modules: list[str] | None = None, backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None, fullgraph: bool = False) -> None:
        self.modules = list(modules or ["denoiser"])
        self.options: dict[str, Any] = {"backend": backend, "mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for path in self.modules:
            module: Any = pl_module
            for name in path.split("."):
                if not hasattr(module, name):
                    raise ValueError(f"CompileModules: {type(pl_module).__name__} has no submodule {path!r} "
                                     "(set init_args.modules to attribute paths such as denoiser)")
                module = getattr(module, name)
            if not isinstance(module, torch.nn.Module):
                raise ValueError(f"CompileModules: {path!r} is a {type(module).__name__}, not an nn.Module")
            module.compile(**self.options)
