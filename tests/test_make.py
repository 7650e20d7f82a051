"""`make` from a fresh clone: the targets follow their inputs (slow: it runs the three trainings, a few steps each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ("ARGS=--trainer.max_steps 2 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 "
        "--trainer.enable_progress_bar false")


def fake_venv(root: Path, clone: Path) -> Path:
    """A VENV for the Makefile that is this interpreter with the clone first on the path (nothing installed)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    main = "import sys; from ldm.cli import main; sys.exit(main())"
    for name, command in (("python", f'exec {sys.executable} "$@"'),
                          ("ldm", f'exec {sys.executable} -c "{main}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\nexport PYTHONPATH={clone}\n{command}\n")
        (bin_dir / name).chmod(0o755)
    (root / ".installed").touch()  # newer than the clone's pyproject.toml: no install
    return root


@pytest.mark.slow
def test_fresh_clone_train_vae_then_train_ldm(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    venv = fake_venv(tmp_path / "venv", clone)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MAKEFLAGS", None)
    make = ["make", "--no-print-directory", "-C", str(clone), f"VENV={venv}", "DATA=shapes",
            "DATA_ARGS=--train 240 --val 64 --shard-size 30 --processes 1", TINY]

    def run(*args: str) -> str:
        done = subprocess.run(make + list(args), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    parts = clone / "checkpoints" / "shapes" / "parts"
    run("train-vae")
    assert (parts / "vae" / "model.safetensors").is_file() and not (parts / "text_encoder").exists()
    out = run("train-ldm", "CACHE_ARGS=--batch-size 64")
    assert "fit --config configs/clip/shapes.yaml" in out  # it trained the text encoder first
    assert (parts / "text_encoder" / "model.safetensors").is_file()
    assert (clone / "checkpoints" / "shapes" / "pipeline" / "unet" / "model.safetensors").is_file()
    # nothing changed: a second train-ldm trains again but reuses the cache (and the parts)
    again = run("-n", "train-ldm", "CACHE_ARGS=--batch-size 64")
    assert "fit --config configs/ldm/shapes.yaml" in again
    assert " cache " not in again and "train-clip" not in again and "train-vae" not in again
    # other cache flags, or a newer VAE, rebuild the cache
    assert " cache " in run("-n", "train-ldm", "CACHE_ARGS=--batch-size 32")
    os.utime(parts / "vae" / "model.safetensors")
    assert " cache " in run("-n", "train-ldm", "CACHE_ARGS=--batch-size 64")
    # a text encoder trained on its own (no value stamps yet) is not trained again by the next train-ldm
    other = "RUN_DIR=checkpoints/other"
    run(other, "train-clip")
    plan = run("-n", other, "train-ldm", "CACHE_ARGS=--batch-size 64")
    assert "fit --config configs/vae/shapes.yaml" in plan and "fit --config configs/clip/shapes.yaml" not in plan
