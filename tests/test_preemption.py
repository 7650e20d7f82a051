"""Preemption with DataLoader workers: the workers leave SIGTERM/SIGUSR1 to the main process.

In-process: a ShieldedLoader worker survives a signal from another process, and the DataLoader still shuts
down a stuck worker (its own SIGTERM) quickly. Out of process: a real ``ldm fit`` with a loader worker,
started in its own process group, is signalled (the whole group, as a batch scheduler does, or the main
process alone): it exits with 128 + signal, its ``last.ckpt`` holds the step it reached (not the last
validation's), stderr has no traceback, no process of the group is left, and ``--ckpt_path last`` resumes.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import IterableDataset

from ldm.cli import main as ldm_main
from ldm.data.workers import ShieldedLoader
from ldm.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ---- in-process: the worker side -------------------------------------------------------------------
class Pids(IterableDataset):
    """Yields the worker's pid every ``pause`` seconds; after ``hang_after`` items it hangs."""

    def __init__(self, pause: float = 0.05, hang_after: int | None = None) -> None:
        self.pause, self.hang_after = pause, hang_after

    def __iter__(self):
        i = 0
        while True:
            if self.hang_after is not None and i >= self.hang_after:
                time.sleep(600)
            yield torch.tensor(os.getpid())
            i += 1
            time.sleep(self.pause)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def mark(path: str, worker_id: int) -> None:
    Path(path).write_text(f"worker {worker_id}")


def test_worker_ignores_a_signal_from_another_process(tmp_path):
    own_init = functools.partial(mark, str(tmp_path / "init"))
    loader = ShieldedLoader(Pids(), batch_size=None, num_workers=1, worker_init_fn=own_init)
    it = iter(loader)
    pid = int(next(it))
    assert (tmp_path / "init").read_text() == "worker 0" and loader.worker_init_fn is own_init  # still runs, kept
    for sig in ("TERM", "USR1"):
        subprocess.run(["kill", f"-{sig}", str(pid)], check=True)  # sent by `kill`, not by the parent
    time.sleep(0.3)
    assert alive(pid) and all(int(next(it)) == pid for _ in range(3))
    worker = it._workers[0]
    del it  # normal shutdown
    worker.join(timeout=10)
    assert worker.exitcode == 0 and not alive(pid)


def test_a_stuck_worker_is_still_terminated_by_its_dataloader(monkeypatch):
    from torch.utils.data import _utils

    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.5)  # the join timeout before terminate()
    it = iter(ShieldedLoader(Pids(hang_after=1), batch_size=None, num_workers=1))
    pid = int(next(it))
    worker = it._workers[0]
    start = time.monotonic()
    it._shutdown_workers()  # joins 0.5 s, then SIGTERM from the parent: the worker exits
    worker.join(timeout=10)
    assert not worker.is_alive() and worker.exitcode == 0 and time.monotonic() - start < 5
    assert not alive(pid)


# ---- a real `ldm fit`, signalled from outside ------------------------------------------------------
class Progress(Callback):
    """Write the global step to ``progress_file`` after each batch, then sleep (so a signal lands mid-run)."""

    def __init__(self, progress_file: str, seconds: float = 0.25) -> None:
        self.progress_file, self.seconds = progress_file, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.progress_file).write_text(str(trainer.global_step))
        time.sleep(self.seconds)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory) -> Path:
    from ldm.data.shapes import build_shapes

    out = tmp_path_factory.mktemp("preempt_shapes")
    build_shapes(out, train=96, val=8, size=32, seed=0, shard_size=12, processes=1)
    return out


def fit_command(data: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ldm"), "fit", "--model", "tiny_model.TinyImageModel",
            "--data", "ldm.data.webdata.WebDataModule", "--data.data_dir", str(data), "--data.batch_size", "4",
            "--data.num_workers", "1", "--data.shuffle_buffer", "0", "--data.val_batch_size", "8",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", *extra]


def environment() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def read_step(progress: Path) -> int | None:
    text = progress.read_text().strip() if progress.is_file() else ""
    return int(text) if text else None  # empty while the callback rewrites it


def group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("target,signum", [
    ("group", signal.SIGTERM),
    pytest.param("group", signal.SIGUSR1, marks=pytest.mark.slow),
    pytest.param("main", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("main", signal.SIGUSR1, marks=pytest.mark.slow),
])
def test_ldm_fit_with_workers_saves_and_exits_when_signalled(tmp_path, tiny_shapes, target, signum):
    root, progress = tmp_path / "run", tmp_path / "progress"
    at_step = 4  # past the validation at step 3, which wrote last.ckpt (save_last)
    command = fit_command(tiny_shapes, root, 40, "--trainer.callbacks+=test_preemption.Progress",
                          f"--trainer.callbacks.progress_file={progress}")
    proc = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, like a batch job
    try:
        deadline, signalled_at, reached = time.monotonic() + 300, None, None
        while time.monotonic() < deadline and proc.poll() is None:
            step = read_step(progress)
            if step is not None and step >= at_step:
                signalled_at = step
                os.killpg(proc.pid, signum) if target == "group" else proc.send_signal(signum)
                for _ in range(200):  # the step it had reached by then (this process may have been slow)
                    if (reached := read_step(progress)) is not None:
                        break
                    time.sleep(0.01)
                break
            time.sleep(0.02)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert signalled_at is not None, err[-3000:]
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    assert f"{signal.Signals(signum).name} received" in out
    assert group_gone(proc.pid), "a process of the run's group outlived it"
    last = root / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last)["global_step"]
    assert signalled_at <= saved <= reached + 1  # the batch under way when the signal came

    assert saved > 3  # later than the validation at step 3, which had written last.ckpt before

    # resumed in this process (saves a second start-up of torch + Lightning)
    assert ldm_main(fit_command(tiny_shapes, root, saved + 1, "--ckpt_path", "last")[1:]) == 0
    assert load_checkpoint(last)["global_step"] == saved + 1
