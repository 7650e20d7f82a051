"""The iDDPM comparison at our scale: L_simple vs L_hybrid pixel-space models, bits/dim (ELBO and PF-ODE) and
sample quality with learned vs fixed variance at 25/50/100 DDPM steps.

    python -m ldm.bench.likelihood --runs checkpoints/likelihood --digits datasets/digits \\
        --shapes datasets/shapes --image-encoder checkpoints/shapes/parts/text_encoder/image_encoder

``--runs`` holds ``{digits,shapes}-{simple,hybrid}/pipeline`` (``ldm fit`` with configs/ldm/digits.yaml and
configs/ldm/shapes-pixel.yaml, the hybrid runs with ``--model.init_args.learned_variance true
--model.init_args.loss hybrid``, then ``ldm export``). Bits/dim are on the first ``--n-*`` val images (mean ±
standard error over images); the bound sums all T terms (``--timesteps all``) unless told otherwise. Sample
quality is the Fréchet distance to real images: in pixel space (64-d) for the 8x8 digits (against the train split),
in the project's CLIP image space (FD-CLIP, ``ldm.evaluation.fid``) for shapes (against val). Every number carries
its CPU seconds; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ldm.evaluation.fid import CLIPImageFeatures, extract_features, frechet_distance, load_split, to_uint8
from ldm.evaluation.likelihood import elbo_bits_per_dim, ode_nll_bits_per_dim, pilot_proposal
from ldm.fastpath import cpu_model
from ldm.pipeline import TextToImagePipeline
from ldm.table import format_table

VARIANTS = {  # name -> (run, DDPM variance)
    "L_hybrid, learned Σ": ("hybrid", "learned"),
    "L_hybrid, β̃": ("hybrid", "fixed_small"),
    "L_simple, β̃": ("simple", "fixed_small"),
    "L_simple, β": ("simple", "fixed_large"),
}



def timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def pixel_features(images: torch.Tensor, gray: bool) -> torch.Tensor:
    """Raw pixels as features (N, D) in [−1, 1]: one channel for gray images."""
    x = images.double() / 127.5 - 1
    return (x[:, :1] if gray else x).flatten(1)


def likelihood_rows(name: str, runs: Path, data: str, n: int, timesteps: int | None, ode_tol: float,
                    batch_size: int, pilot: int, n_ode: int | None = None,
                    parts: tuple[str, ...] = ("elbo", "ode")) -> list[dict[str, Any]]:
    rows = []
    for run in ("simple", "hybrid"):
        pipe = TextToImagePipeline.from_pretrained(runs / f"{name}-{run}" / "pipeline")
        real = load_split(data, "val", n, pipe.config.height)
        variances = ("fixed_small", "fixed_large") if run == "simple" else ("learned", "fixed_small")
        for variance in variances if "elbo" in parts else ():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            proposal = None
            if timesteps is not None and pilot:
                proposal = pilot_proposal(pipe, real.images[:pilot], real.captions[:pilot], variance=variance)
            res, wall, cpu = timed(elbo_bits_per_dim, pipe, real.images, real.captions, timesteps=timesteps,
                                   variance=variance, batch_size=batch_size, chunk=8, proposal=proposal)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            s = res.summary()
            how = "all T terms" if timesteps is None else f"{timesteps} terms IS (pilot {pilot})"
            rows.append({"data": name, "loss": f"L_{run}", "method": f"ELBO, Σ = {variance}, {how}",
                         "bpd": s["bits_per_dim"],
                         "se": s["standard_error"], "prior": s["prior_bpd"], "kl": s["kl_bpd"],
                         "decoder": s["decoder_bpd"], "n": s["n"], "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)})
            print(rows[-1], flush=True)
        if "ode" not in parts:
            continue
        k = n_ode or n
        res, wall, cpu = timed(ode_nll_bits_per_dim, pipe, real.images[:k], real.captions[:k], method="dopri5",
                               rtol=ode_tol, atol=ode_tol, batch_size=batch_size)
        s = res.summary()
        method = f"PF-ODE (dopri5 {ode_tol:g}, nfe {s['nfe_mean']:.0f})"
        rows.append({"data": name, "loss": f"L_{run}", "method": method,
                     "bpd": s["bits_per_dim"], "se": s["standard_error"], "n": s["n"], "cpu_s": round(cpu, 1),
                     "wall_s": round(wall, 1)})
        print(rows[-1], flush=True)
    return rows


def quality_rows(name: str, runs: Path, real_features: torch.Tensor, features, n: int, steps: list[int],
                 batch_size: int, variants: list[str], seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    pipes = {run: TextToImagePipeline.from_pretrained(runs / f"{name}-{run}" / "pipeline")
             for run in ("simple", "hybrid")}
    for variant in variants:
        run, variance = VARIANTS[variant]
        for k in steps:
            images, wall, cpu = timed(pipes[run].generate, [""] * n, steps=k, sampler="ddpm", variance=variance,
                                      guidance=1.0, seed=seed, batch_size=batch_size, progress=False)
            fd = frechet_distance(real_features, features(to_uint8(images)))
            rows.append({"data": name, "variant": variant, "steps": k, "fd": fd, "n": n, "seed": seed,
                         "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("checkpoints/likelihood"))
    p.add_argument("--digits", default="datasets/digits")
    p.add_argument("--shapes", default="datasets/shapes")
    p.add_argument("--image-encoder", default="checkpoints/shapes/parts/text_encoder/image_encoder")
    p.add_argument("--n-digits", type=int, default=128, help="val images for digits bits/dim")
    p.add_argument("--n-shapes", type=int, default=64, help="val images for shapes bits/dim")
    p.add_argument("--n-ode-shapes", type=int, default=32, help="of those, images for the shapes PF-ODE bits/dim")
    p.add_argument("--timesteps-digits", default="all", help="KL terms for digits: all or a count")
    p.add_argument("--timesteps-shapes", default="100", help="KL terms for shapes: all or a count")
    p.add_argument("--pilot", type=int, default=4, help="images of the exhaustive pilot that sets the importance "
                                                          "proposal π(t) ∝ √E[L_t²] when a count of terms is used")
    p.add_argument("--ode-tol", type=float, default=1e-4)
    p.add_argument("--samples-digits", type=int, default=1000)
    p.add_argument("--samples-shapes", type=int, default=200)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="sampling variants (default: all for digits, all but 'L_hybrid, β̃' for shapes)")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (every variant uses the same noise)")
    p.add_argument("--only", choices=("digits", "shapes"), default=None)
    p.add_argument("--skip", nargs="*", choices=("nll", "elbo", "ode", "quality"), default=[],
                   help="parts to leave out (nll = elbo and ode)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/likelihood/results.json"))
    args = p.parse_args(argv)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}
    datasets = [d for d in ("digits", "shapes") if args.only in (None, d)]
    for name in datasets:
        data = args.digits if name == "digits" else args.shapes
        load_start = os.getloadavg()
        parts = tuple(x for x in ("elbo", "ode") if x not in args.skip and "nll" not in args.skip)
        if parts:
            n = args.n_digits if name == "digits" else args.n_shapes
            text = args.timesteps_digits if name == "digits" else args.timesteps_shapes
            timesteps = None if text == "all" else int(text)
            n_ode = None if name == "digits" else args.n_ode_shapes
            results[f"{name}_nll"] = likelihood_rows(name, args.runs, data, n, timesteps, args.ode_tol, args.batch_size,
                                                     args.pilot, n_ode, parts)
        if "quality" not in args.skip:
            if name == "digits":
                real = load_split(data, "train", 1500, 8)
                features = lambda images: pixel_features(images, gray=True)  # noqa: E731
                n = args.samples_digits
            else:
                real = load_split(data, "val", 2000, 32)
                extractor = CLIPImageFeatures.from_part(args.image_encoder)
                features = lambda images: extract_features(extractor, images)  # noqa: E731
                n = args.samples_shapes
            variants = args.variants or [v for v in VARIANTS if name == "digits" or v != "L_hybrid, β̃"]
            real_features = features(real.images)
            half = len(real.images) // 2
            floor = frechet_distance(real_features[:half], real_features[half:2 * half])  # per-image features
            results[f"{name}_quality"] = {"real_vs_real_fd": floor, "real_n": len(real.images),
                                          "rows": quality_rows(name, args.runs, real_features, features, n, args.steps,
                                                               args.batch_size, variants, args.seed)}
        results[f"{name}_loadavg"] = {"start": load_start, "end": os.getloadavg()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name in datasets:
        if f"{name}_nll" in results:
            print(format_table(results[f"{name}_nll"], [("loss", "loss", ""), ("method", "method", ""),
                                                         ("bpd", "bits/dim", ".3f"), ("se", "± s.e.", ".3f"),
                                                         ("cpu_s", "CPU s", ".0f")], markdown=True))
        if f"{name}_quality" in results:
            print(format_table(results[f"{name}_quality"]["rows"], [("variant", "variant", ""), ("steps", "steps", ""),
                                                                     ("fd", "FD", ".3f")], markdown=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
