"""ldm.allocator: freed memory is reused instead of faulted back from the kernel; the user's own settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import ldm.cli
from ldm import allocator

GLIBC = allocator._glibc() is not None

# Allocates, touches and frees a 64 MiB tensor (above glibc's largest automatic mmap threshold, 32 MiB) ten times
# after ten for warm-up (the heap settles in the first few) and prints whether keep_freed_memory() took effect and
# each round's minor page faults.
CHILD = """
import json, resource, sys, torch
from ldm.allocator import keep_freed_memory
applied = keep_freed_memory()
for _ in range(10):
    torch.ones(16 << 20).sum()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def run_child(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "LDM_ALLOCATOR" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's (Linux)")
def test_freed_memory_is_reused_instead_of_faulted_back():
    kept, system = run_child(), run_child(LDM_ALLOCATOR="system")
    assert kept["applied"] and not system["applied"]
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")

    def faulted(run: dict) -> int:  # rounds whose 64 MiB came as fresh pages from the kernel
        return sum(f > pages / 2 for f in run["faults"])

    assert faulted(system) >= 9  # the C library's default: (nearly) every round maps fresh, zeroed pages
    assert faulted(kept) <= 2    # kept: the same heap block is handed out again (the heap may move once or twice)


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's (Linux)")
def test_the_users_own_glibc_tunables_are_left_alone():
    assert not run_child(MALLOC_TRIM_THRESHOLD_="131072")["applied"]


def test_the_ldm_command_sets_the_allocator_before_any_work(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ldm.cli, "keep_freed_memory", lambda: calls.append("allocator"))
    monkeypatch.setattr(ldm.cli, "_dispatch", lambda argv: calls.append(argv) or 0)
    assert ldm.cli.main(["generate", "--prompt", "x"]) == 0
    assert calls == ["allocator", ["generate", "--prompt", "x"]]
