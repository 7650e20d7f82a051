"""Training at scale and through faults: Lightning callbacks and plugins for any ldm LightningModule.

``ldm fit`` switches on AtomicCheckpointIO, FinalCheckpoint, PreemptionCheckpoint, SkipNonFiniteSteps, SeedEveryStep and
FitToTimeBudget itself (``ldm.cli.train.add_robustness``), whatever the config says; the rest are opt-in:

- :class:`AtomicCheckpointIO` (plugin): checkpoints are written to a temp file and renamed, so a crash never
  leaves a corrupt ``last.ckpt``; loads are ``weights_only=True`` and a failure names the file.
- :class:`FinalCheckpoint`: a fit that ends between two validations still leaves its final state in ``last.ckpt``.
- :class:`PreemptionCheckpoint`: SIGTERM/SIGUSR1 → ``last.ckpt`` at the next batch end on all ranks → exit.
- :class:`SkipNonFiniteSteps`: a NaN/inf loss or gradient skips the optimizer step on all ranks (counted);
  too many in a row stop the run with the last good weights in ``last.ckpt``.
- :class:`SeedEveryStep` and :class:`ResumableLoader`: random and data streams that resume exactly.
- :class:`StepTimer` and :class:`AllReduceTimer`: step time breakdown (data/forward/backward/optimizer/all-reduce).
- :class:`FitToTimeBudget`: with ``max_time``, re-plans ``max_steps`` from the measured speed so that the run
  and its LR schedule (:func:`warmup_cosine` over :func:`planned_steps`) end inside the budget.
- :class:`CompileModules`: ``torch.compile`` the U-Net (or any submodule) in place, from YAML.
- :class:`ShardedStrategy`: FSDP2 on CPUs (gloo) and GPUs, the EMA sharded with the weights, pickle-free
  full or per-rank checkpoints (``configs/trainer/fsdp.yaml``).
- :class:`ContinueFrom` (``ldm fit --continue-from CKPT``): a new stage of a run (another resolution) starting
  from its last checkpoint: weights, optimizer state and step count go on where shapes still match.
"""

from ldm.data.resumable import ResumableLoader
from ldm.training.budget import FitToTimeBudget, planned_steps, warmup_cosine
from ldm.training.checkpoint_io import (
                                        AtomicCheckpointIO,
                                        CheckpointLoadError,
                                        FinalCheckpoint,
                                        SafeFSDPStrategy,
                                        atomic_torch_save,
                                        resume_checkpoint_path,
                                        save_resume_checkpoint,
)
from ldm.training.compile import CompileModules
from ldm.training.nonfinite import NonFiniteLossError, SkipNonFiniteSteps
from ldm.training.preemption import Preempted, PreemptionCheckpoint
from ldm.training.profiling import AllReduceTimer, StepTimer
from ldm.training.progressive import ContinueFrom
from ldm.training.resume import SeedEveryStep, step_seed
from ldm.training.sharded import ShardedStrategy

__all__ = ["AtomicCheckpointIO", "CheckpointLoadError", "FinalCheckpoint", "SafeFSDPStrategy", "atomic_torch_save",
           "resume_checkpoint_path", "save_resume_checkpoint", "NonFiniteLossError", "SkipNonFiniteSteps",
           "Preempted", "PreemptionCheckpoint", "AllReduceTimer", "StepTimer", "ResumableLoader", "SeedEveryStep",
           "step_seed", "CompileModules", "ContinueFrom", "ShardedStrategy", "FitToTimeBudget", "planned_steps",
           "warmup_cosine"]
