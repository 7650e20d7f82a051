"""DataLoader workers that leave the preemption signals to the main process.

A batch scheduler ends a job by signalling its whole process group (SLURM's time limit, ``kill -- -PGID``),
so DataLoader workers receive SIGTERM/SIGUSR1 together with the trainer. PyTorch's workers die of it (their
SIGTERM handler only treats the parent's own SIGTERM as a request to exit), the main process then fails
with "DataLoader worker exited unexpectedly" before ``PreemptionCheckpoint`` can save.

:class:`ShieldedLoader` workers instead *block* the signals of :data:`PREEMPTION_SIGNALS` and wait for them
on a small thread with ``sigwaitinfo`` (POSIX), which tells who sent each one:

* SIGTERM from the parent process is the DataLoader's own shutdown of a worker that did not stop in time
  (``_shutdown_workers`` → ``Process.terminate``) or multiprocessing's exit handler: the worker exits at
  once with status 0, exactly what PyTorch's own handler does, so shutdown stays clean and never hangs;
* anything else (the scheduler, ``kill`` from a shell) is dropped: the main process, signalled too when the
  whole group was, decides — checkpoint at the next batch end and exit with 128 + signal — and then shuts
  the workers down normally. Workers still exit on their own when the main process dies (PyTorch's
  watchdog, within ``MP_STATUS_CHECK_INTERVAL`` = 5 s of their last batch).

The signals are also blocked in the main thread while the workers are forked, so a signal that arrives
before a new worker has set this up waits (pending) instead of killing it. Platforms without
``sigwaitinfo`` (macOS, Windows) keep PyTorch's behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator

from torch.utils.data import DataLoader

# signals a worker leaves to the main process; PreemptionCheckpoint adds the ones it is configured with
PREEMPTION_SIGNALS: set[int] = {int(signal.SIGTERM), int(signal.SIGUSR1)} if hasattr(signal, "SIGUSR1") else set()
SUPPORTED = hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")


UNBLOCKABLE = {int(s) for s in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)) if s is not None}


def shield_in_workers(signums: Iterable[int]) -> None:
    """Add signals that loader workers started from now on leave to the main process (SIGKILL and
    SIGSTOP cannot be caught and are left out)."""
    PREEMPTION_SIGNALS.update(int(s) for s in signums if int(s) not in UNBLOCKABLE)


def _route(signums: set[int], parent: int) -> None:
    """The worker's signal thread: exit on the parent's SIGTERM, drop every other shielded signal."""
    while True:
        info = signal.sigwaitinfo(signums)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def leave_signals_to_main_process(signums: Iterable[int] | None = None) -> None:
    """In a worker process: block ``signums`` (default :data:`PREEMPTION_SIGNALS`) and route them (see the
    module docstring)."""
    signums = set(PREEMPTION_SIGNALS if signums is None else signums)
    if not SUPPORTED or not signums:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    for signum in signums:  # handlers inherited from the main process (or PyTorch's) would run in the worker
        signal.signal(signum, signal.SIG_DFL)  # not SIG_IGN: an ignored signal is discarded, never waited for
    threading.Thread(target=_route, args=(signums, os.getppid()), name="ldm-worker-signals", daemon=True).start()


class _WorkerInit:
    """``worker_init_fn``: shield the worker, then run the caller's own init (picklable for spawn; the signal
    set travels with it, as a spawned worker does not see the parent's additions to PREEMPTION_SIGNALS)."""

    def __init__(self, user_fn: Callable[[int], Any] | None, signums: Iterable[int]) -> None:
        self.user_fn, self.signums = user_fn, frozenset(signums)

    def __call__(self, worker_id: int) -> None:
        leave_signals_to_main_process(self.signums)
        if self.user_fn is not None:
            self.user_fn(worker_id)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block :data:`PREEMPTION_SIGNALS` in this thread for the duration (pending ones arrive afterwards)."""
    if not SUPPORTED or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ShieldedLoader(DataLoader):
    """A ``DataLoader`` whose worker processes leave the preemption signals to the main process.

    Same arguments as ``DataLoader``. The shielding is added to ``worker_init_fn`` only while the workers
    are started (it runs first, then the loader's own ``worker_init_fn``), so the attribute itself stays
    what the caller or Lightning (worker seeding) set.
    """

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        own = self.worker_init_fn
        self.worker_init_fn = _WorkerInit(own, PREEMPTION_SIGNALS)
        try:
            with signals_blocked():  # the workers fork here and inherit the blocked mask: no signal is lost
                return super()._get_iterator()
        finally:
            self.worker_init_fn = own
