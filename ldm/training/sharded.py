"""Fully sharded data parallel that works on CPUs and GPUs alike: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Lightning's ``FSDPStrategy`` wraps FSDP1, which refuses CPU devices ("FSDP needs a non-CPU accelerator device")
and so cannot be tested without GPUs. :class:`ShardedStrategy` builds on Lightning's ``ModelParallelStrategy``
(FSDP2 over a device mesh; gloo on CPU, NCCL on GPU) and:

* **shards** each trainable root of the module (``PartModule.shard_roots()``: the denoiser of an LDM, the
  networks of a VAE) with every submodule of the ``shard_modules`` classes as its own unit (gathered just
  before use, resharded after), all ranks one data-parallel group (ZeRO-3: parameters, gradients and AdamW
  moments are split over the ranks);
* **shards the EMA too**: ``PartModule.after_sharding`` rebuilds the EMA from the sharded parameters, so each
  shadow tensor is a DTensor holding this rank's slice (its update is a local lerp, no communication), and
  exports gather it (``ldm.training.sharded.full_tensor``) on every rank;
* **checkpoints without pickle**: ``sharded_checkpoint: false`` (default) writes one ordinary file gathered on
  rank 0 (``ldm export`` and ``--ckpt_path`` read it weights-only); ``true`` writes a folder with one
  ``shard-RRRRR.pt`` per rank (this rank's slices, each DTensor stored as its local tensor + global shape +
  offset) and ``meta.pt`` (everything else), all readable with ``torch.load(weights_only=True)``, unlike
  ``torch.distributed.checkpoint``, whose metadata is a pickle. :func:`load_sharded_checkpoint` assembles the
  full weights from such a folder (``ldm export --ckpt FOLDER``); a resume on as many ranks reloads each slice.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from ldm.io import CheckpointLoadError, atomic_write, load_checkpoint

SHARDED_FORMAT = "ldm-sharded-1"
META = "meta.pt"
ALLOWED_PREFIXES = ("ldm.", "torch.nn.")
DEFAULT_UNITS = ("ldm.modules.unet.ResBlock", "ldm.modules.attention.SpatialTransformer")


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.pt"


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it); a plain tensor as it is."""
    return value.full_tensor() if _is_dtensor(value) else value


def import_module_classes(names: Iterable[str]) -> tuple[type, ...]:
    """The ``nn.Module`` classes named (``ldm.…`` or ``torch.nn.…`` only: a config cannot name other code)."""
    classes = []
    for name in names:
        if not name.startswith(ALLOWED_PREFIXES):
            raise ValueError(f"shard_modules: {name!r} is not an ldm or torch.nn module class")
        module, _, cls = name.rpartition(".")
        value = getattr(importlib.import_module(module), cls, None)
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            raise ValueError(f"shard_modules: {name!r} is not an nn.Module class")
        classes.append(value)
    return tuple(classes)


# ---- the sharded checkpoint format ------------------------------------------------------------------------
def _to_plain(value: Any) -> Any:
    """DTensors in a nested state → {"_dtensor": local, "shape": global, "offset": [...]} records (weights-only)."""
    if _is_dtensor(value):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return {"_dtensor": value.to_local().detach().cpu().contiguous(), "shape": list(value.shape),
                "offset": [int(o) for o in offset]}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def _from_plain(value: Any, like: Any = None) -> Any:
    """Inverse of :func:`_to_plain` for this rank, rebuilding DTensors on ``like``'s mesh and placements."""
    if isinstance(value, dict) and "_dtensor" in value:
        if like is None or not _is_dtensor(like):
            raise CheckpointLoadError("a sharded checkpoint slice has no sharded counterpart in this run (was it "
                                      "written with another shard_modules or strategy?)")
        from torch.distributed.tensor import DTensor

        local = value["_dtensor"].to(like.to_local().device, like.dtype)
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    if isinstance(value, dict):
        return {k: _from_plain(v, like.get(k) if isinstance(like, dict) else None) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_plain(v, like[i] if isinstance(like, list) and i < len(like) else None)
                for i, v in enumerate(value)]
    return value


def _assemble(records: list[Any]) -> Any:
    """One full value from every rank's record of it (slices placed at their offsets; replicated: rank 0's)."""
    first = records[0]
    if isinstance(first, dict) and "_dtensor" in first:
        full = torch.zeros(first["shape"], dtype=first["_dtensor"].dtype)
        for record in records:
            local = record["_dtensor"]
            index = tuple(slice(o, o + n) for o, n in zip(record["offset"], local.shape))
            full[index] = local
        return full
    if isinstance(first, dict):
        return {k: _assemble([r[k] for r in records]) for k in first}
    return first


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def load_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint folder as one ordinary checkpoint dict: full weights (``state_dict``) + the metadata.

    Optimizer states are left out (they only serve a resume on as many ranks). Every file is read weights-only."""
    path = Path(path)
    meta = load_checkpoint(path / META, require=("ldm_sharded_format",))
    if meta.get("ldm_sharded_format") != SHARDED_FORMAT:
        raise CheckpointLoadError(f"{path}: not an ldm sharded checkpoint ({META} lacks ldm_sharded_format)")
    world = int(meta["ldm_world_size"])
    files = [path / shard_file(r) for r in range(world)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointLoadError(f"{path}: the sharded checkpoint of {world} ranks lacks {missing}")
    shards = [load_checkpoint(f, require=("state_dict",)) for f in files]
    return {**meta, "state_dict": _assemble([s["state_dict"] for s in shards])}


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank, CPU (gloo) or GPU (NCCL); see the module docstring.

    Args:
        shard_modules: class paths of the submodules that become their own FSDP units (default: the U-Net's
            ResBlock and SpatialTransformer); the roots (``PartModule.shard_roots()``) are units too.
        sharded_checkpoint: write per-rank checkpoint folders instead of one file gathered on rank 0.
        mixed_precision: ``"bf16"``: FSDP2 gathers parameters in bfloat16 and reduces gradients in float32
            (``MixedPrecisionPolicy``); None: the parameters' own dtype.
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3; False: ZeRO-2).
        process_group_backend: ``gloo`` or ``nccl`` (default: by device).
    """

    def __init__(self, shard_modules: list[str] | None = None, sharded_checkpoint: bool = False,
                 mixed_precision: str | None = None, reshard_after_forward: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(save_distributed_checkpoint=sharded_checkpoint, process_group_backend=process_group_backend,
                         timeout=timeout)
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"mixed_precision must be null or 'bf16', got {mixed_precision!r}")
        self.shard_classes = import_module_classes(DEFAULT_UNITS if shard_modules is None else shard_modules)
        self.mixed_precision, self.reshard_after_forward = mixed_precision, reshard_after_forward
        self.sharded_checkpoint = sharded_checkpoint

    def setup_environment(self) -> None:
        # one data-parallel group over every process (ModelParallelStrategy's "auto" would be tensor parallel)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    # ---- sharding (called from PartModule.configure_model) ---------------------------------------------
    def shard(self, module: nn.Module) -> None:
        """``fully_shard`` every ``shard_modules`` submodule of each root of ``module``, then the root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        roots = list(module.shard_roots()) if hasattr(module, "shard_roots") else [module]
        for root in roots:
            for sub in list(root.modules()):
                if sub is not root and isinstance(sub, self.shard_classes):
                    fully_shard(sub, **kwargs)
            fully_shard(root, **kwargs)
        if hasattr(module, "after_sharding"):
            module.after_sharding()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not self.sharded_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        own = {"state_dict": _to_plain(checkpoint.pop("state_dict")),
               "optimizer_states": _to_plain(checkpoint.pop("optimizer_states", []))}
        atomic_write(path / shard_file(self.global_rank), lambda tmp: torch.save(own, tmp))
        if self.global_rank == 0:
            meta = {**_to_plain(checkpoint), "ldm_sharded_format": SHARDED_FORMAT, "ldm_world_size": self.world_size}
            atomic_write(path / META, lambda tmp: torch.save(meta, tmp))
        self.barrier()

    def _load_full(self, path: Path) -> dict[str, Any]:
        """Resume from one full file (read weights-only): its weights scattered into the shards, then the optimizer
        states; entries the module keeps out of its checkpoints (the LDM's frozen parts) keep their values."""
        from lightning_fabric.strategies.model_parallel import _load_raw_module_state, _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        checkpoint = load_checkpoint(path)
        state = checkpoint.pop("state_dict")
        for name, value in self.lightning_module.state_dict().items():
            if name not in state and not _is_dtensor(value):
                state[name] = value
        strict = self.lightning_module.strict_loading
        _load_raw_module_state(state, self.model, strict=strict)
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        for optimizer, saved in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(self.model, optimizer, _rekey_optimizer_state_if_needed(saved, self.model),
                                     options=options)
        return checkpoint

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return self._load_full(path)
        if not is_sharded_checkpoint(path):
            raise CheckpointLoadError(f"{path} is a folder but not an ldm sharded checkpoint (no {META}); "
                                      "torch.distributed.checkpoint folders are not read (their metadata is a pickle)")
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        meta = load_checkpoint(path / META, require=("ldm_sharded_format",))
        if int(meta.get("ldm_world_size", -1)) != self.world_size:
            raise CheckpointLoadError(f"{path} was written by {meta.get('ldm_world_size')} ranks, this run has "
                                      f"{self.world_size}: export it (ldm export --ckpt {path}) and start from the "
                                      "full weights, or resume on as many ranks")
        own = load_checkpoint(path / shard_file(self.global_rank), require=("state_dict",))
        options = StateDictOptions(full_state_dict=False)
        current = get_model_state_dict(self.model, options=options)
        state = _from_plain(own["state_dict"], current)
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=False,
                                                                         strict=self.lightning_module.strict_loading))
        for optimizer, saved in zip(self.optimizers, own.get("optimizer_states", [])):
            like = get_optimizer_state_dict(self.model, optimizer, options=options)
            set_optimizer_state_dict(self.model, optimizer, _from_plain(saved, like), options=options)
        return {k: v for k, v in meta.items() if not k.startswith("ldm_sharded")}
