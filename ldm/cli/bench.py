"""``ldm bench``: ldm vs diffusers in one table (``ldm.bench.suite``), ``--install`` the set-up time; the
detailed benchmarks ``ldm bench data|unet|ddp|lcm|interop|profile``. A table on stdout, JSON under
checkpoints/bench/."""

from __future__ import annotations

import argparse
import shlex

from ldm.cli import checks
from ldm.errors import UsageError

HELP = ("speed vs diffusers in one table (ldm bench), the install time (--install); details: data loader (data), "
        "U-Net vs diffusers (unet), DDP layouts (ddp), few-step students vs their teacher (lcm), "
        "SD conversion parity and cost (interop), GPU readiness at SD scale (gpu)")

POSITIVE = checks.int_at_least(1)


def _layout(text: str) -> tuple[int, int]:
    p, _, t = text.partition("x")
    if not (p.isdigit() and t.isdigit() and int(p) > 0 and int(t) > 0):
        raise argparse.ArgumentTypeError(f"expected PxT such as 2x1 (P processes, T threads each), got {text!r}")
    return int(p), int(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm.bench.suite import GROUPS
    from ldm.cli import DefaultsHelpFormatter as fmt

    parser.epilog = (
        "Without a BENCHMARK: one table, each row ldm vs its reference at the same config and weights, interleaved "
        "rounds after warm-up, medians; speedup = reference time / ours. Groups: kernels (this CPU's peak GFLOP/s, "
        "best of GEMMs and 3x3 convolutions, fp32 and bf16); denoiser (training step and forward vs diffusers' "
        "UNet2DConditionModel at the shapes and mid configs: img/s, peak memory, FLOPs, percent of peak); vae "
        "(encode/decode vs diffusers' AutoencoderKL); generate (end to end, 20 DDIM steps with CFG, vs a "
        "StableDiffusionPipeline converted from the same pipeline); data (shard loader and cached latents vs the "
        "training step's consumption); fastpath (each switch on vs off); compile (torch.compile vs eager, compile "
        "time included). Examples: `ldm bench --only denoiser generate --rounds 3`; `make bench` (also writes "
        "docs/results/bench.md); `ldm bench --tiny` (seconds). Times are wall and CPU seconds: on a shared machine "
        "compare the cpu-s column.")
    parser.add_argument("--only", nargs="+", choices=GROUPS, metavar="GROUP",
                        help=f"measure only these row groups of the table ({', '.join(GROUPS)}); default: all")
    parser.add_argument("--rounds", type=POSITIVE, default=5, help="interleaved timed rounds per row")
    parser.add_argument("--warmup", type=checks.int_at_least(0), default=2, help="untimed calls per contender first")
    parser.add_argument("--batch", type=POSITIVE, default=32, help="denoiser batch size")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (minutes of compiling)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and one round: checks the plumbing in seconds")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown with the date and CPU "
                        "(e.g. docs/results/bench.md)")
    parser.add_argument("--install", action="store_true",
                        help="instead: time `make install` in a fresh venv with pip and with uv (slow; needs the "
                             "package index)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threads", type=POSITIVE, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default="checkpoints/bench/bench.json", help="JSON results file")
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=False)
    p = sub.add_parser("data", formatter_class=fmt, help="data-loader throughput vs bare PIL decoding",
                       description="Decoded images per second of the shard loader, in-process and with DataLoader "
                                   "workers, beside bare PIL decoding of the same PNGs.")
    p.add_argument("--data-dir", default="datasets/shapes",
                   help="dataset folder (6,000 shapes samples built if missing)")
    p.add_argument("--split", default="train", help="split to read")
    p.add_argument("--samples", type=POSITIVE, default=10_000, help="images decoded per measurement")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="batch size")
    p.add_argument("--resolutions", type=POSITIVE, nargs="+", default=[32, 64], help="output resolutions")
    p.add_argument("--workers", type=checks.int_at_least(0), nargs="+", default=[0, 2], help="DataLoader worker counts")
    p.add_argument("--out", default="checkpoints/bench/data_loader.json", help="JSON result file")

    from ldm.bench.unet import CANDIDATES

    p = sub.add_parser("unet", formatter_class=fmt,
                       help="U-Net training/sampling step vs diffusers' UNet2DConditionModel",
                       description="Training-step and sampling throughput of ldm's U-Net and diffusers' with the same "
                                   "config and weights, interleaved round by round.")
    p.add_argument("--config", action="append", choices=sorted(CANDIDATES) + ["sd15"],
                   help="U-Net config(s) to measure (repeatable); default: all shapes candidates")
    p.add_argument("--batch", type=POSITIVE, default=128, help="images per training step")
    p.add_argument("--size", type=POSITIVE, default=8, help="latent height = width")
    p.add_argument("--tokens", type=POSITIVE, default=24, help="text tokens per caption (context length L)")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps per model (after warm-up)")
    p.add_argument("--warmup", type=checks.int_at_least(0), default=2, help="untimed warm-up steps per model")
    p.add_argument("--rounds", type=POSITIVE, default=5, help="interleaved rounds the timed steps are split into")
    p.add_argument("--channels-last", action="store_true", help="run both models in channels_last memory format")
    p.add_argument("--no-diffusers", action="store_true", help="measure ldm's U-Net only (no reference)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default="checkpoints/bench/unet.json", help="JSON results file")

    p = sub.add_parser("ddp", formatter_class=fmt, help="data-parallel training throughput: P processes x T threads",
                       description="The LDM U-Net trained through Lightning in each layout PxT (P DDP processes on "
                                   "gloo, T threads each) on synthetic latents; img/s and a step-time breakdown.")
    p.add_argument("--config", default=None,
                   help="LDM config whose U-Net is measured (default: the packaged ldm/shapes.yaml)")
    p.add_argument("--layouts", type=_layout, nargs="+", default=[(1, 1), (2, 1), (1, 2)],
                   help="PxT: P processes with T threads each; the first is the speed-up reference")
    p.add_argument("--batch", type=POSITIVE, default=32, help="images per process per step")
    p.add_argument("--steps", type=POSITIVE, default=20, help="timed steps per layout")
    p.add_argument("--warmup", type=checks.int_at_least(0), default=3, help="untimed steps per layout")
    p.add_argument("--out", default="checkpoints/bench/ddp.json", help="JSON results file")

    p = sub.add_parser("gpu", formatter_class=fmt,
                       help="GPU readiness: each part a few hundred bf16 DDP steps at SD size",
                       description="Train the KL-f8 VAE, an SD-sized CLIP and the SD 1.5 U-Net for --steps steps each "
                                   "in bf16 with DDP on every GPU, sample, and write img/s, step time and peak memory "
                                   "(make gpu-check). Needs CUDA unless --size tiny.")
    p.add_argument("--steps", type=POSITIVE, default=300, help="optimizer steps per part")
    p.add_argument("--warmup", type=checks.int_at_least(0), default=20, help="steps before the timing starts")
    p.add_argument("--size", choices=("sd", "tiny"), default="sd", help="sd: SD-like models; tiny: a CPU smoke test")
    p.add_argument("--devices", default="-1", help="GPUs to use (-1: all)")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision")
    p.add_argument("--parts", type=checks.comma_list(str), default="vae,clip,ldm",
                   help="parts to train (ldm needs both)")
    p.add_argument("--work-dir", default="checkpoints/gpu-check", help="folder of the data, parts and sample grid")
    p.add_argument("--out", default="checkpoints/gpu-check/gpu_check.json", help="JSON results file")

    from ldm.bench import lcm

    p = sub.add_parser("lcm", formatter_class=fmt, help="few-step students vs their teacher: adherence, FD, time/image",
                       description="Prompt adherence, FD-CLIP and interleaved sampling time of LCM students against "
                                   "their teacher, same prompts and seeds (docs/results/lcm.md).")
    lcm.add_arguments(p)

    from ldm.bench import interop

    p = sub.add_parser("interop", formatter_class=fmt, help="`ldm convert`: image parity with diffusers, SD-1.5 cost",
                       description="Image parity of converted pipelines with diffusers on tiny random SD 1.x / 2.x "
                                   "pipelines (--parity, the default), and the time, CPU time and peak memory of "
                                   "each `ldm convert` of an SD-1.5-sized pipeline (--sd15 FOLDER).")
    interop.add_arguments(p)

    from ldm.bench import profile

    p = sub.add_parser("profile", formatter_class=fmt,
                       help="where the denoiser's time goes: operators, ours vs diffusers",
                       description="Self CPU time per operator of the denoiser's training step or forward, ours beside "
                                   "diffusers' UNet2DConditionModel at the same config and weights (torch.profiler).")
    profile.add_arguments(p)


def _command(args: argparse.Namespace) -> str:
    """The ``ldm bench`` command line that reproduces this run."""
    parts = ["ldm", "bench"]
    if args.only:
        parts += ["--only", *args.only]
    for flag, value, default in (("--rounds", args.rounds, 5), ("--warmup", args.warmup, 2),
                                 ("--batch", args.batch, 32), ("--threads", args.threads, None),
                                 ("--device", args.device, "cpu")):
        if value != default:
            parts += [flag, str(value)]
    parts += [flag for flag, on in (("--no-compile", args.no_compile), ("--tiny", args.tiny)) if on]
    return " ".join(shlex.quote(p) for p in parts + (["--markdown", args.markdown] if args.markdown else []))


def run_suite(args: argparse.Namespace) -> dict:
    import torch

    from ldm.bench import suite

    device = checks.torch_device("--device", args.device)
    markdown = checks.output_file("--markdown", args.markdown, (".md",)) if args.markdown else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.install:
        from ldm.bench import install

        result = install.benchmark(log=print)
        print(install.format_table(result))
        return result
    settings = suite.Settings.tiny_run() if args.tiny else suite.Settings()
    settings.device, settings.compile = str(device), settings.compile and not args.no_compile
    if not args.tiny:
        settings.rounds, settings.warmup, settings.batch = args.rounds, args.warmup, args.batch
    shown: list[dict] = []

    def show(rows: list[dict]) -> None:
        shown.extend(rows)
        print(suite.format_rows(shown), flush=True)
        print(flush=True)

    result = suite.benchmark(args.only, settings, on_rows=show)
    if markdown is not None:
        from ldm.io import atomic_write

        old = markdown.read_text() if markdown.is_file() else ""
        text = suite.markdown_report(result, _command(args), kept=old)
        atomic_write(markdown, lambda tmp: tmp.write_text(text))
        print(f"wrote {markdown}")
    return result


def run(args: argparse.Namespace) -> int:
    from ldm.io import write_json

    out = checks.output_file("--out", args.out, (".json",))
    if args.bench is None:
        result = run_suite(args)
    elif args.bench == "data":
        from ldm.data import bench

        result = bench.benchmark(args.data_dir, args.split, args.samples, args.batch_size, args.resolutions,
                                 args.workers)
        print(bench.format_table(result))
    elif args.bench == "unet":
        import torch

        from ldm.bench import unet

        device = checks.torch_device("--device", args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        shown = []

        def show(r: dict) -> None:
            shown.append(r)
            print(unet.format_table([r]).splitlines()[-1] if len(shown) > 1 else unet.format_table([r]), flush=True)

        result = unet.benchmark(args.config, batch=args.batch, size=args.size, tokens=args.tokens, steps=args.steps,
                                warmup=args.warmup, rounds=args.rounds, with_diffusers=not args.no_diffusers,
                                channels_last=args.channels_last, device=device, on_result=show)
    elif args.bench == "gpu":
        import torch

        from ldm.bench import gpu

        if args.size == "sd" and not torch.cuda.is_available():
            raise UsageError("ldm bench gpu needs a CUDA GPU (none is visible here); --size tiny runs the same "
                             "sequence with tiny models on the CPU")
        unknown = set(args.parts) - {"vae", "clip", "ldm"}
        if unknown or ("ldm" in args.parts and not {"vae", "clip"} <= set(args.parts)):
            raise UsageError(f"--parts: choose among vae,clip,ldm (ldm needs vae and clip), got {','.join(args.parts)}")
        checks.output_dir("--work-dir", args.work_dir)
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        devices = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
        result = gpu.gpu_check(args.work_dir, args.steps, args.warmup, args.size, accelerator,
                               devices if accelerator == "gpu" else 1, args.precision, tuple(args.parts))
        if int(__import__("os").environ.get("LOCAL_RANK", "0")) != 0:
            return 0  # ranks > 0 (started by Lightning re-running this command) leave the writing to rank 0
        print(gpu.format_table(result))
    elif args.bench == "profile":
        from ldm.bench import profile

        result = profile.benchmark(args)
        print(f"{args.kind} step, {args.config} config, batch {args.batch}, ours ran as {result['ran_as']}")
        print(result["table"])
    elif args.bench == "interop":
        from ldm.bench import interop

        result = interop.benchmark(args)
        print(result["table"])
    elif args.bench == "lcm":
        from ldm.bench import lcm

        result = lcm.benchmark(args)
        print("\n" + result["table"])
    else:
        from ldm.bench import ddp
        from ldm.cli.train import resolve_config

        config = checks.existing_file("--config", resolve_config(args.config)) if args.config else ddp.DEFAULT_CONFIG
        result = ddp.benchmark(config, args.layouts, batch=args.batch, steps=args.steps, warmup=args.warmup)
        print(ddp.format_table(result["results"]))
    write_json(out, result)
    print(f"wrote {out}")
    return 0
