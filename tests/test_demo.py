"""`ldm demo`: the stages' command lines and budget arithmetic (what `make demo` ran before), the runner's
order, progress and failure handling with stand-in commands, and (slow) the real demo at tiny sizes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from ldm.cli import main as ldm_main
from ldm.demo import (
    DemoSettings,
    DemoStageError,
    Stage,
    adherence_images,
    max_time,
    plan,
    planned_after_ldm_s,
    random_pipeline,
    run_demo,
    sampling_seconds,
    seconds_of,
    unet_seconds,
)
from ldm.errors import UsageError

LDM = [sys.executable, "-m", "ldm.cli"]


def test_the_stages_run_the_commands_make_demo_ran():
    stages = plan(DemoSettings())
    assert [s for s in stages] == ["data", "vae", "text encoder", "probe", "cache", "unet", "adherence"]
    commands = {name: [c[len(LDM):] for c in stage.commands] for name, stage in stages.items()}
    assert all(c[:len(LDM)] == LDM for stage in stages.values() for c in stage.commands)
    assert commands["data"] == [["data", "shapes", "--out", "datasets/shapes"]]
    assert commands["vae"] == [
        ["fit", "--config", "configs/vae/shapes.yaml", "--export-to", "checkpoints/shapes/parts/vae",
         "--trainer.max_time", "00:00:03:00", "--trainer.max_steps", "4000"]]
    assert commands["text encoder"] == [
        ["fit", "--config", "configs/clip/shapes.yaml", "--export-to", "checkpoints/shapes/parts/text_encoder",
         "--trainer.max_time", "00:00:02:45", "--trainer.max_steps", "5000"]]
    assert commands["probe"] == [["probe", "--data-dir", "datasets/shapes", "--out", "checkpoints/shapes/parts/probe",
                                  "--steps", "800", "--detector-steps", "600"]]
    assert commands["cache"] == [["cache", "--vae", "checkpoints/shapes/parts/vae", "--text-encoder",
                                  "checkpoints/shapes/parts/text_encoder", "--data", "datasets/shapes",
                                  "--out", "checkpoints/shapes/cache", "--max-samples", "30000"]]
    assert commands["adherence"] == [["adherence", "--pipeline", "checkpoints/shapes/pipeline", "--probe",
                                      "checkpoints/shapes/parts/probe", "--data", "datasets/shapes", "--n", "200",
                                      "--pair-n", "200", "--grid", "checkpoints/shapes/samples/demo.png",
                                      "--pair-grid", "checkpoints/shapes/samples/demo_pairs.png",
                                      "--out", "checkpoints/shapes/adherence.json"]]
    # one core each for everything that runs beside something else, and for the 2-process U-Net
    assert {n: s.threads for n, s in stages.items()} == {"data": None, "vae": 1, "text encoder": 1, "probe": 1,
                                                         "cache": 1, "unet": 1, "adherence": None}
    assert stages["vae"].log == Path("checkpoints/shapes/logs/train-vae.log")
    assert stages["probe"].log == Path("checkpoints/shapes/logs/probe.log")


def test_the_unet_gets_what_is_left_of_the_budget_counted_from_the_start():
    assert DemoSettings().after_ldm_s is None  # measured in the run (below)
    settings = DemoSettings(after_ldm_s=60)  # 870 s in all, 60 s kept for after the U-Net
    assert unet_seconds(settings, start=1_000.0, now=1_300.0) == 510
    assert unet_seconds(settings, start=1_000.0, now=1_000.0 + 809.5) == 0
    assert max_time(510) == "00:00:08:30" and max_time(3725) == "00:01:02:05" and max_time(90061) == "01:01:01:01"
    unet = plan(settings, 510)["unet"].commands
    assert unet == [LDM + ["fit", "--config", "configs/ldm/shapes.yaml", "--config", "configs/trainer/ddp-cpu.yaml",
                           "--export-to", "checkpoints/shapes/pipeline",
                           "--trainer.max_time", "00:00:08:30", "--trainer.max_steps", "10000"]]
    # in the run, the U-Net trains until a time of day: its start-up comes out of its training time
    unet = plan(settings, 510, unet_end=1_810.4)["unet"].commands[0]
    assert unet[unet.index("--end-by") + 1] == "1810" and unet[unet.index("--trainer.max_time") + 1] == "00:00:08:30"


def test_the_time_after_the_unet_comes_from_what_the_run_measured():
    # 2 fit overheads (the U-Net's export; the adherence's start-up and loading) + the adherence's timed sampling
    # (1.1: room for the machine's drift between the timing at the start and the adherence at the end)
    assert planned_after_ldm_s(fit_overhead_s=30.0, sampling_s=40.0) == pytest.approx(2 * 30 + 1.1 * 40)
    assert planned_after_ldm_s(fit_overhead_s=-3.0, sampling_s=10.0) == pytest.approx(11.0)  # never negative
    settings = DemoSettings()
    assert unet_seconds(settings, start=1_000.0, now=1_300.0, after_ldm_s=123.0) == 870 - 300 - 123
    assert seconds_of("00:00:03:00") == 180 and seconds_of(max_time(90061)) == 90061
    # the sampling timed: 200 single-object and 200 two-object prompts, and 2 grids of 40 prompts x 4 images
    assert adherence_images(settings) == 400 + 320 and adherence_images(DemoSettings(adherence_n=10)) == 20 + 80


def test_sampling_time_is_measured_on_a_random_pipeline_of_the_three_configs(tmp_path, monkeypatch):
    from tiny_parts import TINY_UNET

    configs = []
    for name, init in (("vae", {"vae": {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4,
                                        "norm_groups": 4, "resolution": 32, "mid_attention": False}}),
                       ("clip", {"text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1,
                                          "embed_dim": 32},
                                 "image": {"tower": "conv", "image_size": 32, "width": 16, "layers": 2,
                                           "embed_dim": 32}}),
                       ("ldm", {"vae_path": "unused", "text_encoder_path": "unused", "resolution": 32,
                                "denoiser": {"type": "unet", **TINY_UNET}})):
        configs.append(str(tmp_path / f"{name}.yaml"))
        Path(configs[-1]).write_text(json.dumps({"model": {"init_args": init}}))  # JSON is YAML
    import torch

    threads = torch.get_num_threads()
    pipe = random_pipeline(tuple(configs))
    assert pipe.denoiser.config.model_channels == 16 and pipe.text_encoder.config.width == 32
    four = sampling_seconds(pipe, images=4, steps=5, batch_size=2, threads=1)
    assert 0 < four < 60 and torch.get_num_threads() == threads  # set to 1 while timing, then restored
    # the split into per-batch and per-step costs, on a clock that advances 0.3 s a batch + 0.1 s a step (wall-clock
    # ratios of tiny runs are noise on a shared machine): 2 batches of 5 steps = 2 x 0.8 s, 4 batches = 4 x 0.8 s
    import ldm.demo as demo

    clock = [0.0]
    generate = pipe.generate

    def timed_generate(prompts, steps, **kwargs):
        clock[0] += 0.3 + 0.1 * steps
        return generate(prompts, steps=steps, **kwargs)

    monkeypatch.setattr(pipe, "generate", timed_generate)
    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])
    assert sampling_seconds(pipe, images=4, steps=5, batch_size=2, threads=1) == pytest.approx(1.6)
    assert sampling_seconds(pipe, images=8, steps=5, batch_size=2, threads=1) == pytest.approx(3.2)
    assert sampling_seconds(pipe, images=7, steps=20, batch_size=2, threads=1) == pytest.approx(4 * 2.3)


def test_other_folders_and_extra_flags_reach_every_command(tmp_path):
    s = DemoSettings(data_dir=str(tmp_path / "d"), run_dir=str(tmp_path / "r"), fit_args=["--trainer.a", "1"],
                     data_args=["--train", "100"], vae_steps=7)
    stages = plan(s, 100)
    assert stages["data"].commands[0][-4:] == ["--out", str(tmp_path / "d"), "--train", "100"]
    vae_fit = stages["vae"].commands[0]
    assert vae_fit[-6:] == ["--trainer.max_time", "00:00:03:00", "--trainer.max_steps", "7", "--trainer.a", "1"]
    assert (["--data.init_args.data_dir", str(tmp_path / "d")]
            == vae_fit[vae_fit.index("--data.init_args.data_dir"):][:2])
    assert str(tmp_path / "r" / "vae") in vae_fit
    unet_fit = stages["unet"].commands[0]
    for flag, value in (("--model.init_args.vae_path", tmp_path / "r" / "parts" / "vae"),
                        ("--data.init_args.cache_dir", tmp_path / "r" / "cache"),
                        ("--trainer.default_root_dir", tmp_path / "r" / "ldm")):
        assert unet_fit[unet_fit.index(flag) + 1] == str(value)
    assert all(str(tmp_path / "r" / "logs") in str(st.log) for st in stages.values())


def fake_plan(tmp_path: Path, fail: str | None = None, slow: str | None = None, delays: dict | None = None):
    """plan() with stand-in commands: each stage appends its name to order.txt (after ``delays[name]`` seconds);
    ``fail`` exits 3."""
    def make(settings: DemoSettings, unet_s: int | None = None, unet_end: float | None = None) -> dict[str, Stage]:
        stages = {}
        for name in ("data", "vae", "text encoder", "probe", "cache", "unet", "adherence"):
            code = f"open({str(tmp_path / 'order.txt')!r}, 'a').write({name!r} + '\\n')"
            if delays and name in delays:
                code = f"import time; time.sleep({delays[name]}); " + code
            if name == slow:
                code = "import time; time.sleep(60)"
            if name == fail:
                code += "; print('boom'); raise SystemExit(3)"
            if name == "adherence":
                tables = "sampler  steps\\nddim     20\\n\\ntwo objects:\\nsampler  all\\nddim    0.5"
                code += f"; print('{tables}\\nwrote x')"
            stages[name] = Stage(name, [[sys.executable, "-c", code]], tmp_path / "logs" / f"{name}.log")
        return stages
    return make


def test_the_runner_keeps_the_order_prints_one_line_per_stage_and_shows_the_results(tmp_path, monkeypatch):
    import ldm.demo

    monkeypatch.setattr(ldm.demo, "plan", fake_plan(tmp_path, delays={"vae": 2.0}))
    lines = []
    monkeypatch.setattr(ldm.demo, "random_pipeline", lambda: "a pipeline")
    monkeypatch.setattr(ldm.demo, "sampling_seconds", lambda pipe, images: 10.0 if pipe == "a pipeline" else None)
    ended = run_demo(DemoSettings(run_dir=str(tmp_path), budget_s=3600), echo=lines.append)
    assert list(ended) == ["data", "text encoder", "vae", "cache", "unet", "probe", "adherence"]
    order = (tmp_path / "order.txt").read_text().split()
    assert order[0] == "data" and order[-1] == "adherence" and order.index("unet") > order.index("cache")
    assert order.index("probe") < order.index("vae")  # started once the text encoder (the shorter part) was done
    progress = [line for line in lines if line.startswith("demo [")]
    # one per finished stage; the start, the sampling timed, "side by side", the probe's start, the cache's, the
    # time kept after the U-Net, its budget, done
    assert len(progress) == 7 + 8
    assert "the adherence's sampling will take ~10 s here" in progress[2]  # timed after the data, on the quiet machine
    kept = next(line for line in progress if "keeping" in line)
    assert "the adherence's sampling ~10 s" in kept
    # adherence's tables, single and two objects, printed at the end
    assert "sampler  steps\nddim     20\n\ntwo objects:\nsampler  all\nddim    0.5" in lines
    assert progress[-1].split("] ")[1].startswith("done in")


def test_a_failed_stage_names_itself_and_its_log_and_stops_the_others(tmp_path, monkeypatch):
    import ldm.demo

    monkeypatch.setattr(ldm.demo, "plan", fake_plan(tmp_path, fail="text encoder", slow="vae"))
    lines = []
    start = time.time()
    with pytest.raises(DemoStageError, match=r"stage 'text encoder' failed \(exit 3\).*text encoder\.log"):
        run_demo(DemoSettings(run_dir=str(tmp_path)), echo=lines.append)
    assert time.time() - start < 30  # the 60-s VAE stand-in was stopped, not waited for
    assert "boom" in "\n".join(lines)  # the log's last lines are shown


def test_too_little_time_for_the_unet_is_an_error_naming_the_budget(tmp_path, monkeypatch):
    import ldm.demo

    monkeypatch.setattr(ldm.demo, "plan", fake_plan(tmp_path))
    settings = DemoSettings(run_dir=str(tmp_path), budget_s=100, after_ldm_s=60, start_time=time.time() - 30)
    with pytest.raises(UsageError, match="--budget-s"):
        run_demo(settings, echo=lambda line: None)
    assert "unet" not in (tmp_path / "order.txt").read_text()


@pytest.mark.slow
def test_ldm_demo_end_to_end_at_tiny_sizes(tmp_path, monkeypatch):
    """The real stages on 600 shapes images with budgets of seconds: every part, the pipeline and the figures."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/ resolve as in `make demo`
    data, run = tmp_path / "data", tmp_path / "run"
    fit = ("--trainer.val_check_interval 10 --trainer.limit_val_batches 1 --trainer.enable_progress_bar false")
    code = ldm_main(["demo", "--data-dir", str(data), "--run-dir", str(run), "--budget-s", "200",
                     "--after-ldm-s", "60", "--min-ldm-s", "10", "--vae-time", "00:00:00:20",
                     "--clip-time", "00:00:00:20", "--cache-samples", "600", "--probe-steps", "20",
                     "--detector-steps", "20",
                     "--adherence-n", "8", "--data-args", "--train 600 --val 64 --shard-size 100 --processes 2",
                     "--fit-args", fit])
    assert code == 0
    for part in ("vae", "text_encoder", "probe"):
        assert (run / "parts" / part / "model.safetensors").is_file()
    assert (run / "pipeline" / "unet" / "model.safetensors").is_file()
    result = json.loads((run / "adherence.json").read_text())
    assert result["n"] == 8 and 0 <= result["results"][0]["all_three"] <= 1
    assert result["pair_n"] == 8 and 0 <= result["results"][0]["pair_all"] <= 1
    assert (run / "parts" / "probe" / "pair_detector" / "model.safetensors").is_file()
    for grid in ("demo.png", "demo_pairs.png"):
        assert (run / "samples" / grid).is_file() and os.path.getsize(run / "samples" / grid) > 0
