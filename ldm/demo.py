"""``ldm demo``: from nothing to a sample grid and its prompt-adherence figures on shapes, in a fixed time budget.

The stages, each one or two ``ldm`` commands run as child processes (their output goes to a log per stage):

1. ``data``: ``ldm data shapes`` (all cores).
2. ``vae`` ∥ ``text encoder``: the VAE and the CLIP text encoder train side by side, one core each
   (``OMP_NUM_THREADS=1``), each for its wall-clock budget (``trainer.max_time``; ``FitToTimeBudget`` fits the
   step count to it, the step counts are only ceilings), then each is exported as a part (``ldm fit --export-to``).
3. ``probe`` ∥ ``cache``: the shapes probe, then the two-object detector, train (from when the first of the two
   parts is done: they need only the data) beside the latent cache of the first ``cache_samples`` training images.
4. ``unet``: the U-Net trains data-parallel in 2 processes (``configs/trainer/ddp-cpu.yaml``) until the end of
   ``budget_s``, counted from ``start_time`` (``make demo`` passes its own start, so the install counts), less
   what its export and the adherence measurement will take (``after_ldm_s``, measured on the machine at hand
   unless given: :func:`planned_after_ldm_s`): a time of day (``ldm fit --end-by``), so its own start-up comes
   out of its training time; then it is exported as the pipeline.
5. ``adherence``: once the probe is done, ``ldm adherence`` of the pipeline: grids and the figures, for single
   objects and for two.

:func:`plan` builds every command (pure: tested without running anything), :func:`run_demo` runs them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import LdmError, UsageError

DEFAULT_DATA_DIR = "datasets/shapes"
DEFAULT_RUN_DIR = "checkpoints/shapes"


class DemoStageError(LdmError):
    """A stage of the demo failed; the message names the stage and its log."""


@dataclass
class DemoSettings:
    """The demo's budgets and places (the defaults are ``make demo``'s DEMO_* variables)."""

    budget_s: float = 870            # DEMO_BUDGET_S: the whole demo, from start_time
    after_ldm_s: float | None = None  # DEMO_AFTER_LDM_S: the U-Net's start-up, export, adherence (None: measured)
    min_ldm_s: float = 60            # fewer seconds than this left for the U-Net: stop with an error
    start_time: float | None = None  # epoch seconds the budget counts from (None: when run_demo starts)
    vae_time: str = "00:00:03:00"    # DEMO_VAE_TIME (trainer.max_time, DD:HH:MM:SS)
    vae_steps: int = 4000            # DEMO_VAE_STEPS (ceiling)
    clip_time: str = "00:00:02:45"   # DEMO_CLIP_TIME
    clip_steps: int = 5000           # DEMO_CLIP_STEPS
    cache_samples: int = 30000       # DEMO_CACHE_SAMPLES
    ldm_steps: int = 10000           # DEMO_LDM_STEPS (ceiling)
    probe_steps: int = 800
    detector_steps: int = 600        # the two-object detector's, trained after the probe in its stage
    adherence_n: int = 200
    data_dir: str = DEFAULT_DATA_DIR
    run_dir: str = DEFAULT_RUN_DIR
    log_dir: str | None = None       # None: <run_dir>/logs
    data_args: list[str] = field(default_factory=list)  # extra flags of `ldm data shapes`
    fit_args: list[str] = field(default_factory=list)   # extra flags of every `ldm fit`

    @property
    def logs(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(self.run_dir) / "logs"

    @property
    def parts(self) -> Path:
        return Path(self.run_dir) / "parts"

    @property
    def pipeline(self) -> Path:
        return Path(self.run_dir) / "pipeline"


@dataclass
class Stage:
    """One stage: commands run one after the other, their output in ``log``, with ``threads`` OpenMP threads."""

    name: str
    commands: list[list[str]]
    log: Path
    threads: int | None = None  # OMP_NUM_THREADS for the stage (None: inherited)


def ldm_command(*args: str) -> list[str]:
    """``ldm ARGS`` as a child process of this interpreter (the same environment as the ``ldm`` script)."""
    return [sys.executable, "-m", "ldm.cli", *args]


def max_time(seconds: float) -> str:
    """``trainer.max_time`` (DD:HH:MM:SS) of a whole number of seconds."""
    s = int(seconds)
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def unet_seconds(settings: DemoSettings, start: float, now: float, after_ldm_s: float | None = None) -> int:
    """What is left of the budget for the U-Net: start + budget_s − after_ldm_s − now, whole seconds
    (``after_ldm_s``: the settings' unless given)."""
    after = settings.after_ldm_s if after_ldm_s is None else after_ldm_s
    return int(start + settings.budget_s - (after or 0.0) - now)


def seconds_of(max_time_text: str) -> int:
    """The seconds of a ``trainer.max_time`` DD:HH:MM:SS."""
    days, hours, minutes, secs = (int(v) for v in max_time_text.split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


# after the U-Net's training, in units of a fit stage's overhead (its wall time beyond its max_time: start-up, last
# checkpoint, export): the U-Net's last checkpoint and export, the adherence stage's start-up, loading and reading
# back. The U-Net's own start-up is not in it: it trains until a time of day (--end-by). On an AVX2 EPYC
# (2026-12-07, fit overheads 12-13 s) that came to 15-25 s beside 50-65 s of sampling (the 400 measured images and
# the grids' 320). The sampling is timed apart, on the quiet machine right after the data stage
# (:func:`sampling_seconds`); AFTER_SAMPLING leaves room for the machine's drift over the run (~10 %).
AFTER_OVERHEADS = 2.0
AFTER_SAMPLING = 1.1
ADHERENCE_THREADS = 2  # the adherence stage's (it runs alone, with the machine's 2 cores)


def planned_after_ldm_s(fit_overhead_s: float, sampling_s: float) -> float:
    """Seconds to keep for after the U-Net's training: ``AFTER_OVERHEADS`` fit overheads + ``AFTER_SAMPLING`` ×
    the adherence's sampling time, both measured in this run."""
    return AFTER_OVERHEADS * max(fit_overhead_s, 0.0) + AFTER_SAMPLING * sampling_s


def adherence_images(settings: DemoSettings) -> int:
    """Images the adherence stage samples: one per single-object and per two-object prompt, and the two grids."""
    from ldm.evaluation.adherence import GRID_IMAGES_PER_PROMPT, GRID_PROMPTS

    return 2 * settings.adherence_n + 2 * GRID_IMAGES_PER_PROMPT * min(GRID_PROMPTS, settings.adherence_n)


SHAPES_CONFIGS = ("configs/vae/shapes.yaml", "configs/clip/shapes.yaml", "configs/ldm/shapes.yaml")


def random_pipeline(configs: tuple[str, str, str] = SHAPES_CONFIGS) -> Any:
    """The pipeline the demo trains, randomly initialised from its (VAE, text encoder, denoiser) ``configs``: it
    costs what the trained one will (the cost of a pipeline depends on its shapes, not its weights)."""
    import tempfile

    import torch
    import yaml

    from ldm.io import save_part
    from ldm.models.autoencoder import AutoencoderModule
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.models.text_encoder import CLIPTextConditioner, ContrastiveCLIP

    def init_args(config: str) -> dict:
        return dict(yaml.safe_load(Path(config).read_text())["model"]["init_args"])

    with tempfile.TemporaryDirectory() as parts, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae_args, clip_args = init_args(configs[0]), init_args(configs[1])
        save_part(AutoencoderModule(vae=vae_args.get("vae")).vae, Path(parts) / "vae")
        text = ContrastiveCLIP(text=clip_args.get("text"), image=clip_args.get("image")).text
        save_part(CLIPTextConditioner(text.config), Path(parts) / "text_encoder")
        init = {**init_args(configs[2]), "vae_path": str(Path(parts) / "vae"),
                "text_encoder_path": str(Path(parts) / "text_encoder")}
        return LatentDiffusion(**init).pipeline(use_ema=False)


def sampling_seconds(pipe: Any, images: int, steps: int = 20, batch_size: int = 100,
                     threads: int = ADHERENCE_THREADS) -> float:
    """Wall seconds ``pipe`` takes to sample ``images`` images like ``ldm adherence`` (dpmpp-2m, ``steps`` steps,
    CFG, batches of ``batch_size``, ``threads`` threads): a 1-step and a 3-step batch are timed after a warm-up and
    the cost split into a per-batch and a per-step part. Meant for a quiet machine (the demo times it before its
    first training)."""
    import torch

    from ldm.data.shapes import eval_prompts

    prompts = [p for p, _ in eval_prompts(min(batch_size, images), 0)]

    def seconds(n_steps: int) -> float:
        begin = time.perf_counter()
        pipe.generate(prompts, steps=n_steps, guidance=4.0, sampler="dpmpp-2m", batch_size=batch_size,
                      progress=False)
        return time.perf_counter() - begin

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds(1)  # warm-up: kernels, the fast-path choice
        one, three = seconds(1), seconds(3)
    finally:
        torch.set_num_threads(previous)
    per_step = max(three - one, 0.0) / 2
    per_batch = max(one - per_step, 0.0)
    batches = -(-images // batch_size)
    return batches * (per_batch + steps * per_step)


def _fit(config: str, settings: DemoSettings, time_limit: str, steps: int, *overrides: str) -> list[str]:
    return ldm_command("fit", "--config", config, *overrides, "--trainer.max_time", time_limit,
                       "--trainer.max_steps", str(steps), *settings.fit_args)


def _place_overrides(settings: DemoSettings, kind: str) -> list[str]:
    """Flags that point a shipped shapes config at --data-dir/--run-dir (none when they are the defaults)."""
    flags = []
    if kind in ("vae", "clip"):
        if settings.data_dir != DEFAULT_DATA_DIR:
            flags += ["--data.init_args.data_dir", settings.data_dir]
        if settings.run_dir != DEFAULT_RUN_DIR:
            flags += ["--trainer.default_root_dir", str(Path(settings.run_dir) / kind)]
    elif kind == "ldm" and settings.run_dir != DEFAULT_RUN_DIR:
        flags += ["--model.init_args.vae_path", str(settings.parts / "vae"),
                  "--model.init_args.text_encoder_path", str(settings.parts / "text_encoder"),
                  "--data.init_args.cache_dir", str(Path(settings.run_dir) / "cache"),
                  "--trainer.default_root_dir", str(Path(settings.run_dir) / "ldm")]
    return flags


def plan(settings: DemoSettings, unet_s: int | None = None, unet_end: float | None = None) -> dict[str, Stage]:
    """Every stage with its commands; the U-Net's ``max_time`` is ``unet_s`` seconds and its ``--end-by``
    ``unet_end`` (known only once the stages before it have run; None plans it with the whole budget less
    ``after_ldm_s`` and no end time)."""
    run, parts, logs = Path(settings.run_dir), settings.parts, settings.logs
    unet_s = int(settings.budget_s - (settings.after_ldm_s or 0)) if unet_s is None else unet_s
    return {
        "data": Stage("data", [ldm_command("data", "shapes", "--out", settings.data_dir, *settings.data_args)],
                      logs / "data.log"),
        "vae": Stage("vae", [
            _fit("configs/vae/shapes.yaml", settings, settings.vae_time, settings.vae_steps,
                 *_place_overrides(settings, "vae"), "--export-to", str(parts / "vae")),
        ], logs / "train-vae.log", threads=1),
        "text encoder": Stage("text encoder", [
            _fit("configs/clip/shapes.yaml", settings, settings.clip_time, settings.clip_steps,
                 *_place_overrides(settings, "clip"), "--export-to", str(parts / "text_encoder")),
        ], logs / "train-clip.log", threads=1),
        "probe": Stage("probe", [ldm_command("probe", "--data-dir", settings.data_dir, "--out", str(parts / "probe"),
                                             "--steps", str(settings.probe_steps),
                                             "--detector-steps", str(settings.detector_steps))],
                       logs / "probe.log", threads=1),
        "cache": Stage("cache", [ldm_command("cache", "--vae", str(parts / "vae"), "--text-encoder",
                                             str(parts / "text_encoder"), "--data", settings.data_dir,
                                             "--out", str(run / "cache"),
                                             "--max-samples", str(settings.cache_samples))],
                       logs / "cache.log", threads=1),
        "unet": Stage("unet", [
            _fit("configs/ldm/shapes.yaml", settings, max_time(unet_s), settings.ldm_steps,
                 "--config", "configs/trainer/ddp-cpu.yaml", *_place_overrides(settings, "ldm"),
                 "--export-to", str(settings.pipeline), *([] if unet_end is None else ["--end-by", f"{unet_end:.0f}"])),
        ], logs / "train-ldm.log", threads=1),
        "adherence": Stage("adherence", [ldm_command(
            "adherence", "--pipeline", str(settings.pipeline), "--probe", str(parts / "probe"), "--data",
            settings.data_dir, "--n", str(settings.adherence_n), "--pair-n", str(settings.adherence_n),
            "--grid", str(run / "samples" / "demo.png"), "--pair-grid", str(run / "samples" / "demo_pairs.png"),
            "--out", str(run / "adherence.json"))], logs / "adherence.log"),
    }


class Job:
    """A stage running in a background thread: its commands one after another, stopped at the first failure."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.returncode, self.failed_command = stage, None, None
        self.seconds = 0.0  # wall time of the stage's commands, once it has ended
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        begin = time.monotonic()
        try:
            self._run_commands()
        except OSError as e:  # the log cannot be written, the interpreter cannot be started, ...
            self.returncode, self.failed_command = 127, [f"({type(e).__name__}: {e})"]
        self.seconds = time.monotonic() - begin

    def _run_commands(self) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see the Makefile)
        if self.stage.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.stage.threads)
        self.stage.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.stage.log, "w") as log:
            for command in self.stage.commands:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                if self._stopped:
                    self.returncode = -1
                    return
                self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True)
                code = self._proc.wait()
                if code != 0:
                    self.returncode, self.failed_command = code, command
                    return
        self.returncode = 0

    def wait(self) -> int:
        self._thread.join()
        return int(self.returncode)

    def stop(self) -> None:
        """Stop the stage: no further command starts, the running one (and its children) get SIGTERM."""
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
        self._thread.join(timeout=30)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print,
             clock: Callable[[], float] = time.time) -> dict[str, float]:
    """Run every stage of :func:`plan`; returns the seconds from ``start_time`` at which each stage ended.

    A failed stage stops the stages still running and raises :class:`DemoStageError` naming it and its log
    (whose last lines are echoed first)."""
    start = clock() if settings.start_time is None else settings.start_time
    stages = plan(settings)
    ended: dict[str, float] = {}
    running: list[Job] = []

    def say(text: str) -> None:
        s = int(clock() - start)
        echo(f"demo [{s // 60:2d}:{s % 60:02d}] {text}")

    def finish(job: Job, what: str) -> None:
        code = job.wait()
        running.remove(job)
        if code != 0:
            echo(_tail(job.stage.log))
            raise DemoStageError(f"stage '{job.stage.name}' failed (exit {code}) in "
                                 f"`{shlex.join(job.failed_command or [])}`; its log: {job.stage.log}")
        ended[job.stage.name] = round(clock() - start, 1)
        say(what)

    def launch(name: str) -> Job:
        job = Job(stages[name])
        running.append(job)
        return job

    try:
        say(f"budget {settings.budget_s:.0f} s; logs in {settings.logs}/")
        built: list[Any] = []
        if settings.after_ldm_s is None:  # built beside the data stage, timed on the quiet machine after it
            builder = threading.Thread(target=lambda: built.append(random_pipeline()), daemon=True)
            builder.start()
        finish(launch("data"), f"data: {settings.data_dir} built (log: {stages['data'].log})")
        sampling = 0.0
        if settings.after_ldm_s is None:
            builder.join()
            if not built:
                raise DemoStageError("building a pipeline to time the adherence's sampling failed (see the lines "
                                     "above); give --after-ldm-s (make demo: DEMO_AFTER_LDM_S) to skip it")
            sampling = sampling_seconds(built.pop(), adherence_images(settings))
            say(f"the adherence's sampling will take ~{sampling:.0f} s here (timed on a random pipeline)")
        vae, clip = launch("vae"), launch("text encoder")
        say(f"training the VAE and the text encoder side by side (logs: {vae.stage.log}, {clip.stage.log})")
        first = clip if seconds_of(settings.clip_time) <= seconds_of(settings.vae_time) else vae
        second = vae if first is clip else clip
        done = {clip: f"text encoder trained and exported to {settings.parts / 'text_encoder'}",
                vae: f"VAE trained and exported to {settings.parts / 'vae'}"}
        finish(first, done[first])
        probe = launch("probe")  # it needs only the data: on the core the first part left
        say(f"training the shapes probe (log: {probe.stage.log})")
        finish(second, done[second])
        # a fit stage's wall time beyond its training time: start-up, last checkpoint, export
        fit_overhead = max(clip.seconds - seconds_of(settings.clip_time), vae.seconds - seconds_of(settings.vae_time))
        cache = launch("cache")
        say(f"writing the latent cache beside the probe (log: {cache.stage.log})")
        finish(cache, f"latent cache of {settings.cache_samples} training images written to "
                      f"{Path(settings.run_dir) / 'cache'}")
        after = settings.after_ldm_s
        if after is None:
            after = planned_after_ldm_s(fit_overhead, sampling)
            say(f"keeping {after:.0f} s for after the U-Net: a fit stage's start-up and export took "
                f"{fit_overhead:.0f} s here, the adherence's sampling ~{sampling:.0f} s")
        left = unet_seconds(settings, start, clock(), after)
        if left < settings.min_ldm_s:
            raise UsageError(f"only {left} s of the --budget-s {settings.budget_s:.0f} s are left for the U-Net "
                             f"(at least {settings.min_ldm_s:.0f} s needed); "
                             "raise --budget-s (make demo: DEMO_BUDGET_S)")
        end = start + settings.budget_s - after
        stages["unet"] = plan(settings, left, end)["unet"]
        clock_time = time.strftime("%H:%M:%S", time.localtime(end))
        say(f"training the U-Net until {clock_time} ({left} s from now, start-up included): what is left of the "
            f"budget (log: {stages['unet'].log})")
        finish(launch("unet"), f"U-Net trained; pipeline exported to {settings.pipeline}")
        finish(probe, f"probe trained and exported to {settings.parts / 'probe'}")
        finish(launch("adherence"), f"adherence measured (log: {stages['adherence'].log})")
    finally:
        for job in list(running):
            job.stop()
    echo(_adherence_table(stages["adherence"].log))
    samples = Path(settings.run_dir) / "samples"
    say(f"done in {int(clock() - start)} s; grids: {samples / 'demo.png'}, {samples / 'demo_pairs.png'}, "
        f"figures: {Path(settings.run_dir) / 'adherence.json'}")
    return ended


def _adherence_table(log: Path) -> str:
    """The tables ``ldm adherence`` printed: single objects, then two objects (from the first header to the first
    ``wrote`` line)."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    start = next((i for i, line in enumerate(lines) if line.startswith("sampler")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("wrote")), len(lines))
    return "\n".join(lines[start:end]).strip()


def settings_from(**values: object) -> DemoSettings:
    """DemoSettings from keyword values, ignoring None (keeps the defaults)."""
    names = {f.name for f in dataclasses.fields(DemoSettings)}
    return DemoSettings(**{k: v for k, v in values.items() if k in names and v is not None})

