"""``ldm bench --install``: the wall time of ``make install`` in a fresh clone and a fresh venv, per installer.

Each installer (``make install INSTALLER=pip`` and ``INSTALLER=uv``, see the Makefile) runs in its own fresh
``git clone`` of this repository's HEAD with empty package caches (a new machine's first set-up), one after the
other. It downloads every dependency (torch included) from the package index: minutes, and network-bound.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm.bench.measure import run_context
from ldm.table import format_table as table

INSTALLERS = ("pip", "uv")


def repo_root() -> Path:
    """The git work tree this ldm was imported from."""
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"ldm bench --install needs a git checkout of ldm; {here} is not in one")
    return Path(out.stdout.strip())


def time_install(installer: str, repo: Path, work: Path) -> dict[str, Any]:
    """Clone ``repo`` into ``work`` and time ``make install INSTALLER=installer`` there with empty caches."""
    clone = work / f"clone-{installer}"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(repo), str(clone)], check=True)
    env = {**os.environ, "PIP_CACHE_DIR": str(work / f"pip-cache-{installer}"),
           "UV_CACHE_DIR": str(work / f"uv-cache-{installer}"), "PIP_NO_INPUT": "1"}
    env.pop("VIRTUAL_ENV", None)
    start, cpu = time.perf_counter(), os.times()
    out = subprocess.run(["make", "install", f"INSTALLER={installer}"], cwd=clone, env=env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - start
    after = os.times()
    row = {"installer": installer, "wall_s": wall, "child_cpu_s": (after.children_user - cpu.children_user)
           + (after.children_system - cpu.children_system), "ok": out.returncode == 0}
    if out.returncode:
        row["error"] = (out.stderr or out.stdout)[-2000:]
    return row


def benchmark(installers: tuple[str, ...] = INSTALLERS, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every installer in turn (fresh clone, fresh venv, empty caches); wall and CPU seconds, and the speed-up of
    each over the first."""
    repo = repo_root()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-install-") as tmp:
        for installer in installers:
            if log:
                log(f"make install INSTALLER={installer} in a fresh clone ...")
            rows.append(time_install(installer, repo, Path(tmp)))
    for row in rows:
        row["speedup"] = rows[0]["wall_s"] / row["wall_s"] if row["ok"] and rows[0]["ok"] else None
    return {"benchmark": "install", "context": run_context(), "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    return table(result["rows"], [("installer", "make install", ""), ("wall_s", "wall s", ".0f"),
                                         ("child_cpu_s", "CPU s", ".0f"), ("speedup", "speedup vs pip", ".2f"),
                                         ("ok", "ok", "")])

