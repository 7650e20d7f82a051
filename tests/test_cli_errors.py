"""One error policy for every `ldm` command: a user mistake is one line on stderr, exit 2, nothing touched.

Each bad input of the table runs the real entry point (``ldm.cli.main``; a few through a child process, to
see what reaches a terminal) in a folder of tiny random parts, a tiny pipeline and tiny shapes shards, and
checks: exit status 2, exactly one non-empty line on stderr that starts ``ldm <command>: error:`` and names
the flag or file, no traceback, and every file of the folder (and of the shards) byte-identical afterwards,
with nothing added.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_parts import export_tiny_parts, tiny_pipeline_dir

from ldm.cli import main as ldm_main
from ldm.errors import LdmError, UsageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good and broken inputs side by side: every bad input of the table points into this folder."""
    w = tmp_path_factory.mktemp("world")
    tiny_pipeline_dir(w / "pipe")
    shutil.copytree(w / "pipe", w / "pipe_novae")
    shutil.rmtree(w / "pipe_novae" / "vae")
    shutil.copytree(w / "pipe", w / "pipe_trunc")
    weights = w / "pipe_trunc" / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(w / "pipe", w / "pipe_badjson")
    (w / "pipe_badjson" / "pipeline.json").write_text("{ not json")
    export_tiny_parts(w / "parts")
    shutil.copytree(w / "parts" / "vae", w / "parts" / "vae_trunc")
    (w / "parts" / "vae_trunc" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (w / "prompts_blank.txt").write_text("\n   \n\n")
    (w / "prompts_latin1.txt").write_bytes("une cr\xe8me\n".encode("latin-1"))
    (w / "a_file.txt").write_text("not a folder\n")
    Image.new("RGB", (16, 16), (200, 40, 40)).save(w / "image.png")  # an image with no ldm metadata
    (w / "table.xlsx").write_bytes(b"PK\x03\x04")
    (w / "garbage.ckpt").write_bytes(os.urandom(256))
    torch.save(torch.zeros(3), w / "tensor.ckpt")
    torch.save({"state_dict": {}}, w / "noclass.ckpt")
    # issue 16's crafted checkpoint: it names a writer function with a path and bytes as "hyper-parameters"
    torch.save({"state_dict": {}, "ldm_class_path": "ldm.io.atomic_write_bytes",
                "hyper_parameters": {"path": str(w / "scratch" / "pwned.txt"), "data": b"pwned"}}, w / "crafted.ckpt")
    (w / "unknown_key.yaml").write_text("trainer:\n  bogus_key: 1\n")
    (w / "bad_syntax.yaml").write_text("trainer: [max_steps: 3\n")
    (w / "scratch").mkdir()  # the working directory of every case (where defaults like samples.png would go)
    return w


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under ``roots``."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


FIT = ["--model", "tiny_model.TinyImageModel", "--data", "ldm.data.webdata.WebDataModule", "--data.data_dir", "{d}"]

# (argv with {w} = the world folder and {d} = the shapes shards, what the error line must name, env)
CASES: list[tuple[str, list[str], str, dict[str, str]]] = [
    # ---- generate: flags ------------------------------------------------------------------------------
    ("gen-steps-0", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--steps", "0"], "--steps", {}),
    ("gen-steps-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--steps", "-3"], "--steps", {}),
    ("gen-steps-text", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--steps", "many"], "--steps", {}),
    ("gen-guidance-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--guidance", "-1"], "--guidance", {}),
    ("gen-guidance-nan", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--guidance", "nan"],
     "--guidance", {}),
    ("gen-guidance-inf", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--guidance", "inf"],
     "--guidance", {}),
    ("gen-rescale-high", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--guidance-rescale", "1.5"],
     "--guidance-rescale", {}),
    ("gen-rescale-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--guidance-rescale", "-0.1"],
     "--guidance-rescale", {}),
    ("gen-eta-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--eta", "-1"], "--eta", {}),
    ("gen-height-0", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--height", "0"], "--height", {}),
    ("gen-width-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--width", "-8"], "--width", {}),
    ("gen-height-30", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--height", "30"], "--height 30", {}),
    ("gen-width-18", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--width", "18"], "--width 18", {}),
    ("gen-n-0", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--n", "0"], "--n", {}),
    ("gen-batch-0", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--batch-size", "0"], "--batch-size", {}),
    ("gen-scale-0", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--scale", "0"], "--scale", {}),
    ("gen-out-noext", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--out", "{w}/scratch/grid"],
     "--out", {}),
    ("gen-out-gif", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--out", "grid.gif"], "--out", {}),
    ("gen-out-dir", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--out", "{w}/parts"], "--out", {}),
    ("gen-sampler", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--sampler", "plms"], "--sampler", {}),
    ("gen-unknown-flag", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--stpes", "3"], "--stpes", {}),
    ("gen-no-prompt", ["generate", "--pipeline", "{w}/pipe"], "--prompt", {}),
    ("gen-lora-missing", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--lora", "{w}/nope"], "--lora", {}),
    ("gen-lora-scale", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--lora", "{w}/pipe:half"],
     "--lora", {}),
    ("gen-lora-not-adapter", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--lora", "{w}/pipe"],
     "--lora", {}),
    ("gen-lcm-on-diffusion", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--sampler", "lcm"],
     "--sampler lcm", {}),
    ("lora-merge-into-itself", ["lora", "merge", "--pipeline", "{w}/pipe", "--lora", "{w}/pipe", "--out", "{w}/pipe"],
     "--lora", {}),
    ("gen-prompts-missing", ["generate", "--pipeline", "{w}/pipe", "--prompts-file", "{w}/nope.txt"], "nope.txt", {}),
    ("gen-prompts-blank", ["generate", "--pipeline", "{w}/pipe", "--prompts-file", "{w}/prompts_blank.txt"],
     "--prompt", {}),
    ("gen-prompts-latin1", ["generate", "--pipeline", "{w}/pipe", "--prompts-file", "{w}/prompts_latin1.txt"],
     "prompts_latin1.txt", {}),
    ("gen-device", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--device", "gpu7"], "--device", {}),
    # ---- generate: files ------------------------------------------------------------------------------
    ("gen-strength-high", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--init-image", "{w}/image.png",
                           "--strength", "1.5"], "--strength", {}),
    ("gen-strength-no-init", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--strength", "0.5"],
     "--init-image", {}),
    ("gen-init-missing", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--init-image", "{w}/nope.png"],
     "nope.png", {}),
    ("gen-init-not-image", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--init-image", "{w}/a_file.txt"],
     "--init-image", {}),
    ("gen-mask-no-init", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--mask", "{w}/image.png"],
     "--init-image", {}),
    ("gen-resample-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--resample", "-1"], "--resample", {}),
    ("gen-invert-sampler", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--init-image", "{w}/image.png",
                            "--invert", "--sampler", "euler"], "--sampler", {}),
    ("gen-classify-bad", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--classifier", "{w}/parts/vae",
                          "--classify", "red"], "--classify", {}),
    ("gen-classifier-missing", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--classifier", "{w}/nope",
                                "--classify", "color=red"], "nope", {}),
    ("gen-classifier-scale-neg", ["generate", "--pipeline", "{w}/pipe", "--prompt", "x", "--classifier-scale", "-1"],
     "--classifier-scale", {}),
    ("gen-from-png-missing", ["generate", "--pipeline", "{w}/pipe", "--from-png", "{w}/nope.png"], "nope.png", {}),
    ("gen-from-png-foreign", ["generate", "--pipeline", "{w}/pipe", "--from-png", "{w}/image.png"], "--from-png", {}),
    ("serve-pipe-missing", ["serve", "--pipeline", "{w}/no_pipe"], "no_pipe", {}),
    ("serve-port", ["serve", "--pipeline", "{w}/pipe", "--port", "70000"], "--port", {}),
    ("guidance-n", ["guidance", "--pipeline", "{w}/pipe", "--classifier", "{w}/parts/vae", "--probe", "{w}/parts/vae",
                    "--data", "{d}", "--n", "1"], "--n", {}),
    ("guidance-pipe-missing", ["guidance", "--pipeline", "{w}/no_pipe", "--classifier", "{w}/parts/vae", "--probe",
                               "{w}/parts/vae", "--data", "{d}"], "no_pipe", {}),
    ("gen-pipe-missing", ["generate", "--pipeline", "{w}/no_pipe", "--prompt", "x"], "no_pipe", {}),
    ("gen-pipe-novae", ["generate", "--pipeline", "{w}/pipe_novae", "--prompt", "x"], "vae", {}),
    ("gen-pipe-trunc", ["generate", "--pipeline", "{w}/pipe_trunc", "--prompt", "x"], "model.safetensors", {}),
    ("gen-pipe-badjson", ["generate", "--pipeline", "{w}/pipe_badjson", "--prompt", "x"], "pipeline.json", {}),
    # ---- data ------------------------------------------------------------------------------------------
    ("data-no-dataset", ["data"], "DATASET", {}),
    ("data-bad-dataset", ["data", "circles", "--out", "{w}/scratch/x"], "circles", {}),
    ("data-no-out", ["data", "shapes"], "--out", {}),
    ("data-size-4", ["data", "shapes", "--out", "{d}", "--size", "4"], "--size", {}),
    ("data-train-neg", ["data", "shapes", "--out", "{d}", "--train", "-1"], "--train", {}),
    ("data-fraction", ["data", "shapes", "--out", "{d}", "--two-object-fraction", "2"], "--two-object-fraction", {}),
    ("data-shard-0", ["data", "shapes", "--out", "{d}", "--shard-size", "0"], "--shard-size", {}),
    ("data-processes-0", ["data", "shapes", "--out", "{d}", "--processes", "0"], "--processes", {}),
    ("data-out-file", ["data", "shapes", "--out", "{w}/a_file.txt", "--train", "4", "--val", "4"], "--out", {}),
    ("data-folder-src", ["data", "folder", "--src", "{w}/no_images", "--out", "{w}/scratch/f"], "--src", {}),
    ("data-folder-xlsx", ["data", "folder", "--src", "{w}/table.xlsx", "--out", "{w}/scratch/f"], "table.xlsx", {}),
    ("data-folder-val", ["data", "folder", "--src", "{w}/parts", "--out", "{w}/scratch/f", "--val-fraction", "1"],
     "--val-fraction", {}),
    ("data-folder-maxside", ["data", "folder", "--src", "{w}/parts", "--out", "{w}/scratch/f", "--max-side", "0"],
     "--max-side", {}),
    ("data-openmoji-font", ["data", "openmoji", "--out", "{w}/scratch/o", "--font", "{w}/no.ttf"], "--font", {}),
    ("data-openmoji-svg", ["data", "openmoji", "--out", "{w}/scratch/o", "--font", "{w}/a_file.txt", "--svg-dir",
                           "{w}/no_svg"], "--svg-dir", {}),
    ("data-openmoji-augment", ["data", "openmoji", "--out", "{w}/scratch/o", "--augment", "-2"], "--augment", {}),
    # ---- cache -----------------------------------------------------------------------------------------
    ("cache-no-vae", ["cache", "--text-encoder", "{w}/parts/text_encoder", "--data", "{d}", "--out", "{w}/c"],
     "--vae", {}),
    ("cache-vae-missing", ["cache", "--vae", "{w}/parts/nope", "--text-encoder", "{w}/parts/text_encoder",
                           "--data", "{d}", "--out", "{w}/scratch/c"], "--vae", {}),
    ("cache-te-missing", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/nope",
                          "--data", "{d}", "--out", "{w}/scratch/c"], "--text-encoder", {}),
    ("cache-vae-is-te", ["cache", "--vae", "{w}/parts/text_encoder", "--text-encoder", "{w}/parts/text_encoder",
                         "--data", "{d}", "--out", "{w}/scratch/c"], "config.json", {}),
    ("cache-vae-trunc", ["cache", "--vae", "{w}/parts/vae_trunc", "--text-encoder", "{w}/parts/text_encoder",
                         "--data", "{d}", "--out", "{w}/scratch/c"], "model.safetensors", {}),
    ("cache-labels-bad", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/parts/text_encoder",
                          "--data", "{d}", "--out", "{w}/scratch/c", "--labels", "color"], "--labels", {}),
    ("cache-data-missing", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/parts/text_encoder",
                            "--data", "{w}/no_data", "--out", "{w}/scratch/c"], "--data", {}),
    ("cache-split", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/parts/text_encoder", "--data", "{d}",
                     "--out", "{w}/scratch/c", "--splits", "train,test"], "test", {}),
    ("cache-resolution-0", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/parts/text_encoder",
                            "--data", "{d}", "--out", "{w}/scratch/c", "--resolution", "0"], "--resolution", {}),
    ("cache-max-samples-0", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/parts/text_encoder",
                             "--data", "{d}", "--out", "{w}/scratch/c", "--max-samples", "0"], "--max-samples", {}),
    ("cache-out-file", ["cache", "--vae", "{w}/parts/vae", "--text-encoder", "{w}/parts/text_encoder",
                        "--data", "{d}", "--out", "{w}/a_file.txt"], "--out", {}),
    # ---- export ----------------------------------------------------------------------------------------
    ("export-no-ckpt", ["export", "--out", "{w}/scratch/e"], "--ckpt", {}),
    ("export-ckpt-missing", ["export", "--ckpt", "{w}/nope.ckpt", "--out", "{w}/scratch/e"], "nope.ckpt", {}),
    ("export-ckpt-garbage", ["export", "--ckpt", "{w}/garbage.ckpt", "--out", "{w}/scratch/e"], "garbage.ckpt", {}),
    ("export-ckpt-tensor", ["export", "--ckpt", "{w}/tensor.ckpt", "--out", "{w}/scratch/e"], "tensor.ckpt", {}),
    ("export-ckpt-noclass", ["export", "--ckpt", "{w}/noclass.ckpt", "--out", "{w}/scratch/e"], "noclass.ckpt", {}),
    ("export-ckpt-crafted", ["export", "--ckpt", "{w}/crafted.ckpt", "--out", "{w}/scratch/e"], "crafted.ckpt", {}),
    ("export-data-dir", ["export", "--ckpt", "{w}/noclass.ckpt", "--out", "{w}/scratch/e", "--data-dir", "{w}/nope"],
     "--data-dir", {}),
    ("export-out-file", ["export", "--ckpt", "{w}/noclass.ckpt", "--out", "{w}/a_file.txt"], "--out", {}),
    # ---- fit / validate (LightningCLI) -----------------------------------------------------------------
    ("fit-config-missing", ["fit", "--config", "{w}/missing.yaml"], "missing.yaml", {}),
    ("fit-config-unknown-key", ["fit", "--config", "{w}/unknown_key.yaml", *FIT], "bogus_key", {}),
    ("fit-config-bad-yaml", ["fit", "--config", "{w}/bad_syntax.yaml", *FIT], "bad_syntax.yaml", {}),
    ("fit-bad-value", ["fit", *FIT, "--trainer.max_steps", "many"], "max_steps", {}),
    ("fit-unknown-flag", ["fit", *FIT, "--trainer.bogus_flag", "1"], "bogus_flag", {}),
    ("fit-unknown-model", ["fit", "--model", "NoSuchModel", "--data", "ldm.data.webdata.WebDataModule"],
     "NoSuchModel", {}),
    ("fit-trainer-config-env", ["fit", *FIT], "LDM_TRAINER_CONFIG", {"LDM_TRAINER_CONFIG": "{w}/no_trainer.yaml"}),
    ("fit-bad-max-time", ["fit", *FIT, "--trainer.max_time", "00:00:00:420"], "00:00:00:420", {}),
    ("fit-export-to-no-value", ["fit", *FIT, "--export-to"], "--export-to needs a value", {}),
    ("fit-end-by-garbage", ["fit", *FIT, "--end-by", "soon"], "--end-by soon: not epoch seconds", {}),
    ("fit-end-by-past", ["fit", *FIT, "--end-by", "2020-01-01T00:00:00"], "--end-by 2020-01-01T00:00:00: that time",
     {}),
    ("validate-end-by", ["validate", *FIT, "--end-by", "9999999999"], "--end-by is a flag of `ldm fit`", {}),
    ("validate-export-to", ["validate", *FIT, "--export-to", "{w}/scratch/x"], "--export-to is a flag of `ldm fit`",
     {}),
    ("validate-config-missing", ["validate", "--config", "{w}/missing.yaml"], "missing.yaml", {}),
    # ---- fid -------------------------------------------------------------------------------------------
    ("fid-n-1", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--n", "1"], "--n", {}),
    ("fid-batch-0", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--batch-size", "0"], "--batch-size", {}),
    ("fid-steps-0", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--steps", "0"], "--steps", {}),
    ("fid-guidance-neg", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--guidance", "-2"], "--guidance", {}),
    ("fid-sampler", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--sampler", "plms"], "plms", {}),
    ("fid-sweep-key", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--sweep", "eta=1,2"], "--sweep", {}),
    ("fid-sweep-steps", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--sweep", "steps=0,5"], "--sweep", {}),
    ("fid-sweep-sampler", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--sweep", "sampler=ddim,plms"],
     "plms", {}),
    ("fid-features", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--features", "dino"], "--features", {}),
    ("fid-inception-missing", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--features", "inception"],
     "--inception-weights", {}),
    ("fid-pipe-missing", ["fid", "--pipeline", "{w}/no_pipe", "--data", "{d}"], "no_pipe", {}),
    ("fid-data-missing", ["fid", "--pipeline", "{w}/pipe", "--data", "{w}/no_data"], "--data", {}),
    ("fid-split", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--split", "test"], "test", {}),
    ("fid-image-encoder", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--image-encoder", "{w}/nope"],
     "--image-encoder", {}),
    ("fid-out-ext", ["fid", "--pipeline", "{w}/pipe", "--data", "{d}", "--out", "{w}/scratch/r.txt"], "--out", {}),
    # ---- adherence, probe, vae-fidelity, toy, bench, demo ---------------------------------------------
    ("adh-n-0", ["adherence", "--pipeline", "{w}/pipe", "--n", "0"], "--n", {}),
    ("adh-steps", ["adherence", "--pipeline", "{w}/pipe", "--steps", "10,0"], "--steps", {}),
    ("adh-guidance", ["adherence", "--pipeline", "{w}/pipe", "--guidance", "1,x"], "--guidance", {}),
    ("adh-sampler", ["adherence", "--pipeline", "{w}/pipe", "--sampler", "ddim,plms"], "plms", {}),
    ("adh-pipe-missing", ["adherence", "--pipeline", "{w}/no_pipe"], "no_pipe", {}),
    ("probe-data-missing", ["probe", "--data-dir", "{w}/no_data", "--out", "{w}/scratch/p"], "--data-dir", {}),
    ("probe-steps-0", ["probe", "--data-dir", "{d}", "--steps", "0"], "--steps", {}),
    ("vaefid-vae-missing", ["vae-fidelity", "--vae", "{w}/nope.ckpt", "--probe", "{w}/parts"], "nope.ckpt", {}),
    ("vaefid-probe-missing", ["vae-fidelity", "--vae", "{w}/parts/vae", "--probe", "{w}/no_probe"], "--probe", {}),
    ("toy-sampler", ["toy", "--out", "{w}/scratch/toy", "--samplers", "plms"], "plms", {}),
    ("toy-steps-0", ["toy", "--out", "{w}/scratch/toy", "--steps", "0"], "--steps", {}),
    ("toy-schedule", ["toy", "--out", "{w}/scratch/toy", "--schedule", "sigmoid"], "--schedule", {}),
    ("toy-out-file", ["toy", "--out", "{w}/a_file.txt"], "--out", {}),
    ("bench-layout", ["bench", "ddp", "--layouts", "2y1"], "--layouts", {}),
    ("bench-out", ["bench", "unet", "--out", "{w}/scratch/unet.txt"], "--out", {}),
    ("demo-vae-time", ["demo", "--vae-time", "3min"], "--vae-time", {}),
    ("demo-budget", ["demo", "--budget-s", "0"], "--budget-s", {}),
    ("demo-start-future", ["demo", "--start-time", "99999999999"], "--start-time", {}),
    ("demo-fit-args", ["demo", "--fit-args", "'unclosed"], "--fit-args", {}),
    ("unknown-command", ["trian"], "trian", {}),
]


def expand(items: list[str], world: Path, data: Path) -> list[str]:
    return [s.replace("{w}", str(world)).replace("{d}", str(data)) for s in items]


def test_the_table_has_at_least_50_cases_over_every_command():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert {"generate", "data", "cache", "export", "fit", "validate", "fid", "adherence", "toy"} <= commands


@pytest.mark.parametrize("name,argv,names,env", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_on_stderr_exit_2_and_touches_nothing(name, argv, names, env, world, shapes_dir,
                                                                      capsys, monkeypatch):
    monkeypatch.chdir(world / "scratch")
    monkeypatch.delenv("LDM_DEBUG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, expand([value], world, shapes_dir)[0])
    before = snapshot(world, shapes_dir)
    code = ldm_main(expand(argv, world, shapes_dir))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured
    assert len(lines) == 1, captured.err
    command = argv[0] if argv[0] in ("generate", "data", "cache", "export", "fit", "validate", "fid", "adherence",
                                     "probe", "vae-fidelity", "toy", "bench", "demo", "lora") else ""
    assert lines[0].startswith(f"ldm {command}".strip()) and ": error: " in lines[0], lines[0]
    assert expand([names], world, shapes_dir)[0] in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(world, shapes_dir) == before


def run_ldm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The ``ldm`` entry point in a child process (what a terminal sees)."""
    environ = {k: v for k, v in os.environ.items() if k != "LDM_DEBUG"}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "ldm.cli", *args], capture_output=True, text=True, env=environ,
                          timeout=120)


@pytest.mark.parametrize("case", ["gen-pipe-trunc", "fit-bad-value"])
def test_in_a_child_process_no_traceback_reaches_the_terminal(case, world, shapes_dir):
    _, argv, names, _ = next(c for c in CASES if c[0] == case)
    before = snapshot(world, shapes_dir)
    result = run_ldm(*expand(argv, world, shapes_dir))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert expand([names], world, shapes_dir)[0] in lines[0] and "Traceback" not in result.stderr
    assert snapshot(world, shapes_dir) == before


def test_debug_shows_the_traceback_of_a_user_error(world, monkeypatch):
    argv = ["generate", "--pipeline", str(world / "pipe"), "--prompt", "x", "--steps", "0"]
    with pytest.raises(UsageError, match="--steps"):
        ldm_main(["--debug", *argv])
    monkeypatch.setenv("LDM_DEBUG", "1")
    with pytest.raises(LdmError, match="no_pipe"):
        ldm_main(["generate", "--pipeline", str(world / "no_pipe"), "--prompt", "x"])
    result = run_ldm("--debug", *argv)
    assert result.returncode != 0 and "Traceback" in result.stderr and "--steps" in result.stderr


def test_an_internal_bug_keeps_its_traceback(world, monkeypatch):
    import ldm.cli.generate

    def broken(args):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(ldm.cli.generate, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        ldm_main(["generate", "--pipeline", str(world / "pipe"), "--prompt", "x"])
