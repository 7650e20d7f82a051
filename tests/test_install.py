"""`make install`'s installer (tools/install.py): uv reads pip's configuration, and any uv failure falls back to pip
with one printed line. The installers themselves are replaced by a recorder (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ldm_install_tool", ROOT / "tools" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

PIP_CONFIG = """\
:env:.cert='/etc/ssl/certs/ca.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/other'
install.index-url='https://example.invalid/simple'
other.index-url='https://ignored.invalid/simple'
"""


def test_pip_configuration_becomes_uv_flags():
    config = install.pip_config(PIP_CONFIG)
    assert config["find-links"] == "/opt/wheels"  # PIP_FIND_LINKS (":env:") wins over pip.conf, as in pip
    assert config["index-url"] == "https://example.invalid/simple"  # only [global]/[install]/env count
    args, env = install.uv_arguments({k: v for k, v in config.items() if k != "index-url"})
    assert args[:2] == ["--index-strategy", "unsafe-best-match"]
    assert args[2:] == ["--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
                        "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca.crt", "UV_HTTP_TIMEOUT": "180"}
    args, _ = install.uv_arguments({"index-url": "https://i.invalid/simple", "no-index": "true"})
    assert args[2:] == ["--index-url", "https://i.invalid/simple", "--no-index"]


class Recorder:
    """Stands in for subprocess: records each command; ``fail`` names the programs that exit 1."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail, self.commands = fail, []

    def __call__(self, command, env):
        self.commands.append(list(command))
        program = " ".join(command[:4])
        code = 1 if any(f in program for f in self.fail) else 0
        out = PIP_CONFIG if command[1:4] == ["-m", "pip", "config"] else ""
        return subprocess.CompletedProcess(command, code, out, "error: no matching distribution\n" if code else "")


def test_uv_installs_with_pips_sources(capsys):
    runner = Recorder()
    assert install.main(["--installer", "uv", "--python", "/v/bin/python", "-e", ".[test]"], runner=runner) == 0
    assert runner.commands[0] == ["/v/bin/python", "-m", "pip", "install", "-q", "uv"]
    uv = runner.commands[-1]
    assert uv[:6] == ["/v/bin/uv", "pip", "install", "-q", "--compile-bytecode", "--python"]
    assert uv[-2:] == ["-e", ".[test]"]
    assert "--constraint" in uv and "file:///opt/b/simple" in uv
    assert not any(c[1:4] == ["-m", "pip", "install"] and c[-1] == ".[test]" for c in runner.commands)
    assert "instead" not in capsys.readouterr().out


@pytest.mark.parametrize("broken", ["uv pip install", "-m pip install"])
def test_any_uv_failure_falls_back_to_pip_with_one_line(capsys, broken):
    """uv's own install failing (pip cannot fetch uv) or uv failing to install the packages: pip takes over."""
    runner = Recorder(fail=(broken,)) if broken.startswith("uv") else None
    if runner is None:  # pip cannot install uv, but can install the packages
        class FirstPipFails(Recorder):
            def __call__(self, command, env):
                done = super().__call__(command, env)
                return subprocess.CompletedProcess(command, 1, "", "no uv\n") if command[-1] == "uv" else done
        runner = FirstPipFails()
    assert install.main(["--installer", "uv", "--python", "/v/bin/python", "-e", ".[test]"], runner=runner) == 0
    assert runner.commands[-1] == ["/v/bin/python", "-m", "pip", "install", "-q", "-e", ".[test]"]
    lines = [line for line in capsys.readouterr().out.splitlines() if "instead" in line]
    assert len(lines) == 1 and lines[0].startswith("make install: ") and "installing with pip instead" in lines[0]


def test_pip_failure_is_the_commands_failure():
    runner = Recorder(fail=("-m pip install",))
    assert install.main(["--installer", "pip", "--python", "/v/bin/python", "-e", "."], runner=runner) == 1
    assert not any("uv" in c[0] for c in runner.commands)
