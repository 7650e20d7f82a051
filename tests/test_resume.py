"""Exact resume: an interrupted run restarted from its checkpoint ends with the weights of an uninterrupted one.

Each test trains a tiny model N steps in one go, then again with an interruption (SIGTERM to itself, or a
crash after a periodic checkpoint) and a restart from ``last.ckpt``, and compares everything bit for bit:
weights, EMA, optimizer moments, LR schedule, step count and the batches each step saw. The three paths
covered: LatentDiffusion on the latent cache (map-style ResumableLoader, EMA, caption dropout, SIGTERM), the
VAE on shards (iterable EpochLoader with a length, manual optimization, crash) and CLIP on shards without
per-shard counts (Lightning pre-fetches a batch; hard negatives drawn from the reseeded RNG).
Runs of the real ``ldm fit`` killed from outside (SIGTERM, SIGKILL) are the slow tests at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from tiny_parts import TINY_UNET, export_tiny_parts

from ldm.cli.train import add_robustness
from ldm.data.latents import LatentDataModule
from ldm.data.webdata import WebDataModule
from ldm.io import load_checkpoint
from ldm.models.autoencoder import AutoencoderModule
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.text_encoder import ContrastiveCLIP
from ldm.training import FinalCheckpoint, Preempted, PreemptionCheckpoint, SeedEveryStep

REPO = Path(__file__).resolve().parents[1]


# ---- tiny data and models ---------------------------------------------------------------------------
def write_latent_cache(root: Path, parts: tuple[Path, Path], n_train: int = 40, n_val: int = 8, tokens: int = 6,
                       dim: int = 32, seed: int = 0) -> Path:
    """A synthetic latent cache in the layout of ``ldm cache`` (4×4×4 latents, ``dim``-wide tokens), recorded as
    written by the exported ``parts`` (VAE, text encoder)."""
    from ldm.io import part_metadata

    g = torch.Generator().manual_seed(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        lengths = torch.randint(2, tokens + 1, (n,), generator=g)
        mask = (torch.arange(tokens)[None] < lengths[:, None]).to(torch.uint8)
        tensors = {"mean": torch.randn(n, 4, 4, 4, generator=g), "std": 0.1 + 0.1 * torch.rand(n, 4, 4, 4, generator=g),
                   "context": (torch.randn(n, tokens, dim, generator=g) * mask[..., None]).half(), "mask": mask,
                   "pooled": torch.randn(n, dim, generator=g).half()}
        (root / split).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / split / "chunk-00000.safetensors"),
                  metadata={"captions": json.dumps([f"{split} caption {i}" for i in range(n)])})
        splits[split] = {"samples": n, "chunks": ["chunk-00000.safetensors"], "skipped": 0, "max_tokens": tokens}
    empty_mask = torch.tensor([[1, 1] + [0] * (tokens - 2)], dtype=torch.uint8)
    save_file({"context": torch.randn(1, tokens, dim, generator=g).half(), "mask": empty_mask,
               "pooled": torch.randn(1, dim, generator=g).half()}, str(root / "empty.safetensors"))
    provenance = {name: part_metadata(path)["_weights_sha256"] for name, path in zip(("vae", "text_encoder"), parts)}
    (root / "info.json").write_text(json.dumps({"format": 2, "max_tokens": tokens, "parts": provenance,
                                                "splits": splits}))
    return root


def tiny_ldm(parts: tuple[Path, Path], **kw: Any) -> LatentDiffusion:
    torch.manual_seed(0)
    args = dict(vae_path=str(parts[0]), text_encoder_path=str(parts[1]), denoiser=dict(TINY_UNET), resolution=16,
                lr_schedule={"warmup_steps": 2}, optimizer={"lr": 2e-3}, p_uncond=0.25, ema_decay=0.9,
                sample_every_n_val=0, val_timesteps=2)
    return LatentDiffusion(**{**args, **kw})


TINY_VAE = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4, resolution=32,
                attn_resolutions=[], mid_attention=False)


def tiny_vae_module() -> AutoencoderModule:
    torch.manual_seed(0)
    return AutoencoderModule(vae=TINY_VAE, optimizer={"lr": 2e-3},
                             lr_schedule={"warmup_steps": 2, "decay": "cosine", "decay_steps": 10},
                             disc_start=None, image_every_n_steps=0, l2_weight=1.0, posterior_logvar_init=-4.0)


def tiny_clip(**kw: Any) -> ContrastiveCLIP:
    torch.manual_seed(0)
    args = dict(text={"context_length": 16, "width": 32, "heads": 2, "layers": 1, "embed_dim": 32},
                image={"image_size": 32, "patch_size": 16, "width": 32, "heads": 2, "layers": 1, "embed_dim": 32},
                optimizer={"lr": 2e-3}, lr_schedule={"warmup_steps": 2}, zero_shot=False, hard_negatives="shapes")
    return ContrastiveCLIP(**{**args, **kw})


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    """40 train samples in 4 shards of 10 (5 batches of 8 per epoch), 8 val samples."""
    from ldm.data.shapes import build_shapes

    out = tmp_path_factory.mktemp("small_shapes")
    build_shapes(out, train=40, val=8, size=32, seed=1, shard_size=10, processes=1)
    return out


# ---- run helpers --------------------------------------------------------------------------------------
class RecordBatches(Callback):
    """What each training step saw (the first caption of the batch), to compare data streams."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch["caption"][0])


class SignalSelf(Callback):
    """Send ``signum`` to this process at the end of batch ``at_step`` (counted in global steps)."""

    def __init__(self, at_step: int, signum: int = signal.SIGTERM) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class CrashAt(Callback):
    """Raise at the start of the batch after ``global_step == at_step`` (a crash between checkpoints)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")  # no checkpoint is written on the way out


def make_trainer(root: Path, steps: int, callbacks: list[Callback], **kw: Any) -> pl.Trainer:
    args = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
                enable_checkpointing=False, deterministic=True, limit_val_batches=0)
    args.update(kw)
    return pl.Trainer(callbacks=[SeedEveryStep(seed=0), *callbacks], **args)


def fit(trainer: pl.Trainer, model: pl.LightningModule, data: pl.LightningDataModule, ckpt: Path | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)


def training_state(trainer: pl.Trainer, model: pl.LightningModule) -> dict[str, Any]:
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizers": [o.state_dict() for o in trainer.optimizers],
            "lrs": [g["lr"] for o in trainer.optimizers for g in o.param_groups],
            "step": trainer.global_step, "epoch": trainer.current_epoch}


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["lrs"] == b["lrs"]
    assert a["weights"].keys() == b["weights"].keys()
    different = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        for (ia, sa), (ib, sb) in zip(sorted(oa["state"].items()), sorted(ob["state"].items())):
            assert ia == ib and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- in-process exact resume --------------------------------------------------------------------------
def test_sigterm_checkpoint_then_resume_equals_uninterrupted_ldm(tmp_path):
    parts = export_tiny_parts(tmp_path / "parts")
    cache = write_latent_cache(tmp_path / "cache", parts)
    steps, stop_at = 8, 3  # 5 batches per epoch: the resumed run crosses an epoch boundary
    val = dict(limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None)

    def run(root: Path, extra: list[Callback], ckpt: Path | None = None):
        model, record = tiny_ldm(parts), RecordBatches()
        trainer = make_trainer(root, steps, [record, *extra, PreemptionCheckpoint()], **val)
        fit(trainer, model, LatentDataModule(str(cache), batch_size=8), ckpt)
        return trainer, model, record.seen

    trainer, model, seen_full = run(tmp_path / "full", [])
    reference = training_state(trainer, model)

    with pytest.raises(Preempted) as stopped:
        run(tmp_path / "cut", [SignalSelf(stop_at)])
    assert stopped.value.code == 128 + signal.SIGTERM
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert Path(stopped.value.path) == ckpt and load_checkpoint(ckpt)["global_step"] == stop_at

    trainer, model, seen_after = run(tmp_path / "cut", [], ckpt)
    assert seen_after == seen_full[stop_at:]  # the data stream continues where it stopped
    assert_same_state(training_state(trainer, model), reference)
    assert int(model.ema.num_updates) == steps


def test_a_fit_that_ends_between_validations_leaves_its_final_state_in_last_ckpt(tmp_path):
    # validation (and Lightning's last.ckpt) at step 5; the run ends at 7: without FinalCheckpoint last.ckpt said 5
    parts = export_tiny_parts(tmp_path / "parts")
    cache = write_latent_cache(tmp_path / "cache", parts)
    val = dict(limit_val_batches=1, val_check_interval=5, check_val_every_n_epoch=None, enable_checkpointing=True)
    results = {}
    for name, extra in (("lightning", []), ("ldm", [FinalCheckpoint()])):
        root = tmp_path / name
        keeper = ModelCheckpoint(dirpath=str(root / "checkpoints"), monitor="val/loss", save_last=True)
        model = tiny_ldm(parts)
        trainer = make_trainer(root, 7, [*extra, keeper], **val)
        fit(trainer, model, LatentDataModule(str(cache), batch_size=8))
        saved = load_checkpoint(root / "checkpoints" / "last.ckpt")
        results[name] = saved["global_step"]
        if name == "ldm":
            final = {k: v for k, v in model.state_dict().items() if k.startswith("denoiser.")}
            assert all(torch.equal(saved["state_dict"][k], v) for k, v in final.items())
    assert results == {"lightning": 5, "ldm": 7}
    assert any(isinstance(cb, FinalCheckpoint) for cb in add_robustness([], [])[0])


def test_crash_after_periodic_checkpoint_then_resume_equals_uninterrupted_vae(tmp_path, small_shapes):
    steps, saved_at, crash_at = 7, 4, 5

    def run(root: Path, extra: list[Callback], ckpt: Path | None = None):
        model, record = tiny_vae_module(), RecordBatches()
        periodic = ModelCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=2, save_last=True,
                                   save_top_k=0)
        trainer = make_trainer(root, steps, [record, *extra, periodic], enable_checkpointing=True)
        data = WebDataModule(str(small_shapes), batch_size=8, num_workers=0, shuffle_buffer=16, val_split=None)
        fit(trainer, model, data, ckpt)
        return trainer, model, record.seen

    trainer, model, seen_full = run(tmp_path / "full", [])
    reference = training_state(trainer, model)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "cut", [CrashAt(crash_at)])
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["global_step"] == saved_at  # steps after it were lost and are redone
    trainer, model, seen_after = run(tmp_path / "cut", [], ckpt)
    assert seen_after == seen_full[saved_at:]
    assert_same_state(training_state(trainer, model), reference)


def test_resume_without_shard_counts_accounts_for_the_prefetched_batch_clip(tmp_path, small_shapes):
    data_dir = tmp_path / "shards"
    for split in ("train", "val"):  # the same shards without info.json: the loader has no length
        (data_dir / split).mkdir(parents=True)
        for shard in (small_shapes / split).glob("*.tar"):
            (data_dir / split / shard.name).write_bytes(shard.read_bytes())
    steps, stop_at = 7, 2

    def run(root: Path, extra: list[Callback], ckpt: Path | None = None):
        model, record = tiny_clip(), RecordBatches()
        trainer = make_trainer(root, steps, [record, *extra, PreemptionCheckpoint()])
        data = WebDataModule(str(data_dir), batch_size=8, num_workers=0, shuffle_buffer=16, val_split=None)
        fit(trainer, model, data, ckpt)
        return trainer, model, record.seen

    trainer, model, seen_full = run(tmp_path / "full", [])
    reference = training_state(trainer, model)
    with pytest.raises(Preempted):
        run(tmp_path / "cut", [SignalSelf(stop_at, signal.SIGUSR1)])
    trainer, model, seen_after = run(tmp_path / "cut", [], tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert seen_after == seen_full[stop_at:]
    assert_same_state(training_state(trainer, model), reference)


# ---- the real `ldm fit`, killed from outside (slow: several fresh processes) ----------------------------
class SlowSteps(Callback):
    """For the subprocess tests: write the global step to ``progress_file`` and sleep after every batch,
    so the parent can send a signal while training is under way."""

    def __init__(self, progress_file: str, seconds: float = 0.3) -> None:
        self.progress_file, self.seconds = progress_file, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.progress_file).write_text(str(trainer.global_step))
        time.sleep(self.seconds)


def ldm_fit_command(parts: tuple[Path, Path], cache: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ldm"), "fit", "--model", "ldm.models.latent_diffusion.LatentDiffusion",
            "--model.vae_path", str(parts[0]), "--model.text_encoder_path", str(parts[1]),
            "--model.denoiser", json.dumps(TINY_UNET), "--model.resolution", "16",
            "--model.lr_schedule", json.dumps({"warmup_steps": 2}),
            "--model.p_uncond", "0.25", "--model.sample_every_n_val", "0",
            "--data", "ldm.data.latents.LatentDataModule", "--data.cache_dir", str(cache), "--data.batch_size", "8",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "5", "--trainer.check_val_every_n_epoch", "null",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", *extra]


def run_until(command: list[str], progress: Path, at_step: int, signum: int, env: dict[str, str]) -> int:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and progress.read_text().strip() and int(progress.read_text()) >= at_step:
            proc.send_signal(signum)
            break
        time.sleep(0.05)
    try:
        return proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()


def unet_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(ckpt)["state_dict"].items() if k.startswith(("denoiser.", "ema."))}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_ldm_fit_killed_from_outside_resumes_exactly(tmp_path, signum):
    parts = export_tiny_parts(tmp_path / "parts")
    cache = write_latent_cache(tmp_path / "cache", parts)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    steps = 10
    full = subprocess.run(ldm_fit_command(parts, cache, tmp_path / "full", steps), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    progress = tmp_path / "progress"
    slow = ["--trainer.callbacks+=test_resume.SlowSteps", f"--trainer.callbacks.progress_file={progress}",
            "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'cut' / 'checkpoints'}",
            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=0"]
    code = run_until(ldm_fit_command(parts, cache, tmp_path / "cut", steps, *slow), progress, 5, signum, env)
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    if signum == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
    else:
        assert code == -signal.SIGKILL
    stopped_at = load_checkpoint(ckpt)["global_step"]
    assert 2 <= stopped_at < steps

    resumed = subprocess.run(ldm_fit_command(parts, cache, tmp_path / "cut", steps, "--ckpt_path", "last"),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = unet_weights(tmp_path / "full" / "checkpoints" / "last.ckpt"), unet_weights(ckpt)
    assert load_checkpoint(ckpt)["global_step"] == steps
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
