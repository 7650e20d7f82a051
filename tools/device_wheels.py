"""`make device-wheels`: the packages a lent GPU machine lacks, as wheels in .whl/ for `tools/device_check.sh`.

The device tool's machines (an H100 or H200 with the image "cuda": Python 3.12, torch, Lightning, transformers,
safetensors, peft, timm, ...) reach no package index, and their image lacks some of ldm's dependencies (compared
with its package list in the tool library's device/KINDS.md as read on 2026-11-17). Those travel with the working
tree as wheels (``carry=[".whl"]``); the device script installs them with ``--no-deps`` into a folder on
PYTHONPATH. Each is taken at the version installed in this venv, the one the test suite ran against, for CPython
3.12 on manylinux x86-64.

    .venv/bin/python tools/device_wheels.py              # download into .whl/
    .venv/bin/python tools/device_wheels.py --dry-run    # print the pip command only
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

# what ldm (and its benchmarks' reference, diffusers) needs that the device image does not hold; their own
# dependencies beyond this list are in the image
DEVICE_LACKS = ("diffusers", "importlib-metadata", "lazy-importer", "open-clip-torch", "ftfy", "wcwidth",
                "webdataset", "braceexpand", "jsonargparse", "docstring-parser", "typeshed-client")
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def requirements(names: tuple[str, ...] = DEVICE_LACKS) -> list[str]:
    """``name==version`` for each package, at the version installed here (a missing one is an error naming it)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"device_wheels: {name} is not installed in this Python ({sys.executable}); "
                             "run `make install` first") from None
    return pins


def pip_command(dest: Path, pins: list[str]) -> list[str]:
    """pip download of ``pins`` alone (no dependencies), binary wheels for the device's Python and platform."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
            "--implementation", "cp", *platforms, "-d", str(dest), *pins]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="folder for the wheels (emptied first)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command, download nothing")
    args = parser.parse_args(argv)
    cmd = pip_command(args.dest, requirements())
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if args.dest.exists():
        shutil.rmtree(args.dest)
    result = subprocess.run(cmd)
    if result.returncode == 0:
        wheels = sorted(args.dest.glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels) / 2**20
        print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.dest}/ (carry it: the device tool's limit is 64 MiB)")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
