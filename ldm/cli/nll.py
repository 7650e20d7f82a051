"""``ldm nll``: negative log-likelihood in bits/dim of a pipeline (or a training checkpoint) on real images.

``--method elbo`` is the variational bound over all T terms (prior, the T−1 KL terms exhaustive with
``--timesteps all`` or stratified-sampled, and the discretized 8-bit decoder; DDPM eq. 5/13, iDDPM §3.3);
``--method ode`` the probability-flow ODE likelihood with Hutchinson probes and dequantization (Song et al.
2021b eq. 39-40; pixel-space pipelines). Each is reported as mean ± standard error over ``--n`` images of the
split. For a latent pipeline the bound adds the VAE's decoder term (see ``ldm.evaluation.likelihood``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldm.cli import checks

HELP = "bits/dim of a pipeline on real images: variational bound (ELBO) and probability-flow ODE likelihood"


def _timesteps(text: str) -> int | None:
    """argparse type: 'all' (None) or a count >= 1."""
    return None if text == "all" else checks.int_at_least(1)(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="exported pipeline folder (vae/ text_encoder/ unet/ scheduler/)")
    source.add_argument("--model", help="a LatentDiffusion training checkpoint (.ckpt); its EMA weights are used")
    parser.add_argument("--data", required=True, help="dataset folder with webdataset shards (DATA/val/*.tar)")
    parser.add_argument("--split", default="val", help="split whose first --n images are scored")
    parser.add_argument("--n", type=checks.int_at_least(2), default=256,
                        help="number of images (the standard error is over them)")
    parser.add_argument("--method", choices=("elbo", "ode", "both"), default="elbo",
                        help="variational bound, PF-ODE likelihood, or both on the same images")
    parser.add_argument("--timesteps", type=_timesteps, default=100,
                        help="KL terms per image: 'all' (exhaustive, T−1) or K stratified-sampled (unbiased)")
    parser.add_argument("--pilot", type=checks.int_at_least(0), default=0,
                        help="with a count of --timesteps: importance-sample them from π(t) ∝ √E[L_t²] (iDDPM §3.3) "
                             "estimated exhaustively on the first PILOT images (0: stratified uniform)")
    parser.add_argument("--variance", choices=("auto", "fixed_small", "fixed_large", "learned"), default="auto",
                        help="reverse-process variance of the bound (auto: learned for a 2C-output denoiser, else β̃)")
    parser.add_argument("--solver", choices=("euler", "heun", "rk4", "dopri5"), default="rk4", help="ODE solver")
    parser.add_argument("--ode-steps", type=checks.int_at_least(1), default=50, help="steps of a fixed-step ODE solver")
    parser.add_argument("--tolerance", type=checks.float_in(1e-12, 1.0), default=1e-5,
                        help="rtol = atol of the adaptive dopri5 solver")
    parser.add_argument("--probes", type=checks.int_at_least(1), default=1,
                        help="Hutchinson probes per image (vectorised)")
    parser.add_argument("--probe", choices=("rademacher", "gaussian"), default="rademacher", help="probe distribution")
    parser.add_argument("--batch-size", type=checks.int_at_least(1), default=64, help="images per model call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise, timesteps, probes and dequantization")
    parser.add_argument("--json", default=None, help="also write the summary rows to this JSON file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def load_pipeline(args: argparse.Namespace, device: str):
    """The pipeline of ``--pipeline``, or of ``--model`` (a checkpoint rebuilt through the registry)."""
    from ldm.errors import UsageError
    from ldm.pipeline import TextToImagePipeline

    if args.pipeline:
        return TextToImagePipeline.from_pretrained(args.pipeline, device=device)
    from ldm.models.checkpoint import rebuild_from_checkpoint

    model, _, _ = rebuild_from_checkpoint(args.model)
    if not hasattr(model, "pipeline"):
        raise UsageError(f"--model {args.model} is a {type(model).__name__} checkpoint; give a LatentDiffusion one")
    return model.pipeline(use_ema=True).to(device)


def check(args: argparse.Namespace) -> None:
    """Every flag that names something, before anything is loaded."""
    if args.pipeline:
        checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    else:
        checks.existing_file("--model", args.model)
    checks.shard_dataset("--data", args.data, [args.split])
    if args.json is not None:
        checks.output_file("--json", args.json, (".json",))
    args.device = checks.torch_device("--device", args.device)


def run(args: argparse.Namespace) -> int:
    check(args)
    from ldm.errors import UsageError
    from ldm.evaluation.fid import load_split
    from ldm.evaluation.likelihood import elbo_bits_per_dim, is_pixel_space, ode_nll_bits_per_dim, pilot_proposal
    from ldm.table import format_table

    device = args.device
    pipe = load_pipeline(args, device)
    if args.method != "elbo" and not is_pixel_space(pipe):
        raise UsageError("--method ode needs a pixel-space pipeline (its latents are the 8-bit pixels); "
                         "use --method elbo for a latent pipeline")
    real = load_split(args.data, args.split, args.n, pipe.config.height)
    rows = []
    if args.method in ("elbo", "both"):
        variance = None if args.variance == "auto" else args.variance
        proposal = None
        if args.pilot and args.timesteps is not None:
            proposal = pilot_proposal(pipe, real.images[:args.pilot], real.captions[:args.pilot], variance=variance)
        result = elbo_bits_per_dim(pipe, real.images, real.captions, timesteps=args.timesteps, variance=variance,
                                   batch_size=args.batch_size, seed=args.seed, proposal=proposal)
        rows.append(result.summary())
    if args.method in ("ode", "both"):
        result = ode_nll_bits_per_dim(pipe, real.images, real.captions, method=args.solver, steps=args.ode_steps,
                                      rtol=args.tolerance, atol=args.tolerance, probes=args.probes, probe=args.probe,
                                      batch_size=args.batch_size, seed=args.seed)
        rows.append(result.summary())
    columns = [("method", "method", ""), ("bits_per_dim", "bits/dim", ".4f"), ("standard_error", "± s.e.", ".4f"),
               ("n", "n", "")]
    extra = sorted({k for r in rows for k in r if k.endswith("_bpd")})
    columns += [(k, k.replace("_bpd", " (bpd)"), ".4f") for k in extra]
    print(format_table(rows, columns))
    for r in rows:
        notes = {k: v for k, v in r.items() if k not in {c[0] for c in columns}}
        print(f"{r['method']}: " + ", ".join(f"{k}={v}" for k, v in notes.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
