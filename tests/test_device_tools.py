"""tools/device_wheels.py and tools/device_check.sh: the prepared run of the GPU checks on a lent device machine
(their CUDA stages need a GPU; here their plumbing: the pins, the stage list, the time budget)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import device_wheels  # noqa: E402


def test_the_wheels_are_pinned_to_the_versions_the_suite_runs_against():
    pins = device_wheels.requirements()
    assert pins == [f"{n}=={importlib.metadata.version(n)}" for n in device_wheels.DEVICE_LACKS]
    assert {"diffusers", "open-clip-torch", "webdataset", "jsonargparse"} <= set(device_wheels.DEVICE_LACKS)
    cmd = device_wheels.pip_command(Path("dest"), pins)
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[-len(pins):] == pins
    assert cmd[cmd.index("-d") + 1] == "dest"


def check(tmp_path: Path, *stages: str, budget: int = 600) -> tuple[int, str]:
    env = {**os.environ, "OUT": str(tmp_path), "LDM_DEVICE": "cpu", "PYTHON": sys.executable,
           "BUDGET_S": str(budget)}
    result = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), *stages], env=env,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, (tmp_path / "log.txt").read_text()


def test_an_unknown_stage_is_refused_by_name(tmp_path):
    rc, log = check(tmp_path, "benchh")
    assert rc == 2 and "unknown stage 'benchh'" in log


def test_stages_past_the_budget_are_skipped_and_said(tmp_path):
    rc, log = check(tmp_path, "bench", "gpu", budget=20)
    assert rc == 0 and "torch" in log and "stages: bench gpu" in log
    assert "== bench: skipped" in log and "== gpu: skipped" in log and "done after" in log
