"""`make install`'s installer (standard library only: it runs before anything is installed).

    python tools/install.py --installer uv  -e '.[test]'    # uv, falling back to pip
    python tools/install.py --installer pip -e '.[test]'    # pip alone

uv is pip-installed into the venv first (so it comes from wherever pip gets packages), then installs the
requirements reading **pip's own configuration** (``pip config list``: index-url, extra-index-url, find-links,
constraint, no-index, cert, default-timeout, from pip.conf files and PIP_* variables alike), with pip's
resolution across indexes (``--index-strategy unsafe-best-match``): both installers see the same sources and pick
the same wheels. Any failure of uv (it cannot be installed, cannot resolve, cannot download) prints ONE line and
pip installs instead; pip's failure is the command's failure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Runner = Callable[[Sequence[str], dict[str, str]], "subprocess.CompletedProcess[str]"]

# pip option -> uv option, for the options that may hold several values (space-separated in pip's config)
LIST_OPTIONS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}


def pip_config(text: str) -> dict[str, str]:
    """``pip config list`` output -> {option: value} with pip's precedence: PIP_* variables (``:env:``) over the
    ``[install]`` section over ``[global]``, and within one section the file listed later (loaded later) wins."""
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        section, dot, option = key.strip().rpartition(".")
        if not sep or not dot or section not in rank:
            continue
        if option not in found or rank[section] >= found[option][0]:
            found[option] = (rank[section], value.strip().strip("'\""))
    return {option: value for option, (_, value) in found.items()}


def uv_arguments(config: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv flags and environment variables that make ``uv pip install`` read the sources pip is configured with."""
    args = ["--index-strategy", "unsafe-best-match"]  # pip's behaviour: the best version over every index
    env: dict[str, str] = {}
    if config.get("index-url"):
        args += ["--index-url", config["index-url"]]
    for option, flag in LIST_OPTIONS.items():
        for value in config.get(option, "").split():
            args += [flag, value]
    if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if config.get("cert"):
        env["SSL_CERT_FILE"] = config["cert"]
    if config.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = config["default-timeout"]
    return args, env


def run(command: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), env=env, capture_output=True, text=True)


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def install_with_uv(python: str, requirements: list[str], runner: Runner = run, uv: str | None = None) -> str | None:
    """Install ``requirements`` with uv; None on success, else why it failed (one line)."""
    env = dict(os.environ)
    if uv is None:
        done = runner([python, "-m", "pip", "install", "-q", "uv"], env)
        if done.returncode:
            return f"pip could not install uv ({last_line(done)})"
        uv = str(Path(python).parent / "uv")
    done = runner([python, "-m", "pip", "config", "list"], env)
    args, extra_env = uv_arguments(pip_config(done.stdout if done.returncode == 0 else ""))
    env.update({k: v for k, v in extra_env.items() if k not in env})
    # --compile-bytecode: pip writes the .pyc files at install, uv does not; without them every process compiles
    # torch and Lightning from source on import (25 s instead of 10 s each, measured on a 2-core CPU where
    # PYTHONDONTWRITEBYTECODE is set, so nothing is ever cached), and `make demo` starts a dozen processes
    done = runner([uv, "pip", "install", "-q", "--compile-bytecode", "--python", python, *args, *requirements], env)
    return None if done.returncode == 0 else f"uv pip install failed ({last_line(done)})"


def install_with_pip(python: str, requirements: list[str], runner: Runner = run) -> int:
    env = dict(os.environ)
    for command in ([python, "-m", "pip", "install", "-q", "--upgrade", "pip"],
                    [python, "-m", "pip", "install", "-q", *requirements]):
        print("+ " + shlex.join(command), flush=True)
        done = subprocess.run(command, env=env) if runner is run else runner(command, env)
        if done.returncode:
            return done.returncode
    return 0


def main(argv: list[str] | None = None, runner: Runner = run, uv: str | None = None) -> int:
    parser = argparse.ArgumentParser(description="make install: uv (falling back to pip) or pip")
    parser.add_argument("--installer", choices=("uv", "pip"), default="uv")
    parser.add_argument("--python", default=sys.executable, help="the venv's interpreter")
    args, requirements = parser.parse_known_args(argv)  # the rest goes to the installer: -e '.[test]'
    if args.installer == "uv":
        print("+ uv pip install " + shlex.join(requirements) + " (with pip's index configuration)", flush=True)
        why = install_with_uv(args.python, requirements, runner, uv)
        if why is None:
            return 0
        print(f"make install: {why}; installing with pip instead (INSTALLER=pip skips uv)", flush=True)
    return install_with_pip(args.python, requirements, runner)


if __name__ == "__main__":
    sys.exit(main())
