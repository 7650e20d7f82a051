"""``ldm demo``: data → VAE ∥ text encoder → probe ∥ latent cache → U-Net → pipeline → adherence, in a time budget.

The flags are ``make demo``'s DEMO_* variables (same names, same defaults); see :mod:`ldm.demo` for the stages.
"""

from __future__ import annotations

import argparse
import re
import shlex
import time

from ldm.cli import checks
from ldm.errors import UsageError

HELP = "train everything on shapes in a time budget (data, VAE, text encoder, cache, U-Net) and measure adherence"


def _max_time(text: str) -> str:
    """argparse type: a Lightning ``max_time`` DD:HH:MM:SS."""
    if not re.fullmatch(r"\d{2}:\d{2}:\d{2}:\d{2}", text):
        raise argparse.ArgumentTypeError(f"expected DD:HH:MM:SS (e.g. 00:00:03:00), got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm.demo import DemoSettings

    d = DemoSettings()
    seconds, positive = checks.float_in(1), checks.int_at_least(1)
    parser.add_argument("--budget-s", type=seconds, default=d.budget_s,
                        help="seconds for the whole demo, counted from --start-time (DEMO_BUDGET_S)")
    parser.add_argument("--after-ldm-s", type=checks.float_in(0), default=d.after_ldm_s,
                        help="seconds kept for the U-Net's export and the adherence (DEMO_AFTER_LDM_S; "
                             "default: measured in the run, from the VAE's and text encoder's start-up and export "
                             "and the adherence's sampling timed on a random pipeline after the data stage)")
    parser.add_argument("--min-ldm-s", type=checks.float_in(0), default=d.min_ldm_s,
                        help="stop with an error when fewer seconds than this are left for the U-Net")
    parser.add_argument("--start-time", type=checks.float_in(0), default=None,
                        help="epoch seconds the budget counts from (make demo passes its start, so the install "
                             "counts; default: now)")
    parser.add_argument("--vae-time", type=_max_time, default=d.vae_time, help="VAE training time (DEMO_VAE_TIME)")
    parser.add_argument("--vae-steps", type=positive, default=d.vae_steps,
                        help="VAE step ceiling (DEMO_VAE_STEPS)")
    parser.add_argument("--clip-time", type=_max_time, default=d.clip_time,
                        help="text-encoder training time (DEMO_CLIP_TIME)")
    parser.add_argument("--clip-steps", type=positive, default=d.clip_steps,
                        help="text-encoder step ceiling (DEMO_CLIP_STEPS)")
    parser.add_argument("--cache-samples", type=positive, default=d.cache_samples,
                        help="training images in the latent cache (DEMO_CACHE_SAMPLES)")
    parser.add_argument("--ldm-steps", type=positive, default=d.ldm_steps, help="U-Net step ceiling (DEMO_LDM_STEPS)")
    parser.add_argument("--probe-steps", type=positive, default=d.probe_steps, help="shapes-probe training steps")
    parser.add_argument("--detector-steps", type=positive, default=d.detector_steps,
                        help="two-object detector training steps")
    parser.add_argument("--adherence-n", type=positive, default=d.adherence_n,
                        help="prompts of the adherence measurement (single-object and two-object, each)")
    parser.add_argument("--data-dir", default=d.data_dir, help="shapes dataset folder to build")
    parser.add_argument("--run-dir", default=d.run_dir, help="folder of the runs, parts, cache, pipeline and results")
    parser.add_argument("--log-dir", default=None, help="folder of the stage logs (default: RUN_DIR/logs)")
    parser.add_argument("--data-args", default=None,
                        help="extra flags of `ldm data shapes`, one string (e.g. \"--train 2000\")")
    parser.add_argument("--fit-args", default=None, help="extra flags of every `ldm fit`, one string")


def run(args: argparse.Namespace) -> int:
    from ldm.demo import run_demo, settings_from

    for flag in ("--data-dir", "--run-dir", "--log-dir"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            checks.output_dir(flag, value)
    if args.start_time is not None and args.start_time > time.time() + 5:
        raise UsageError(f"--start-time {args.start_time:.0f} is in the future (it is {time.time():.0f} now)")
    extra = {}
    for flag in ("--data-args", "--fit-args"):
        try:
            extra[flag[2:].replace("-", "_")] = shlex.split(getattr(args, flag[2:].replace("-", "_")) or "")
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    settings = settings_from(**{**vars(args), **extra})
    run_demo(settings)
    return 0
