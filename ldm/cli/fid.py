"""``ldm fid``: FD (FID or FD in CLIP space), KID, CLIP score and shapes adherence of a pipeline, offline.

Generates one image per caption of the first ``--n`` samples of the real split, compares feature statistics
(the real ones cached under ``--cache-dir``), prints a table beside the reference points (real train vs val,
VAE reconstructions) and writes JSON; ``--sweep`` runs a grid and adds a CSV and PNG plots.
"""

from __future__ import annotations

import argparse
from typing import Any

from ldm.cli import checks

HELP = "FD / FID, KID, CLIP score and prompt adherence of a pipeline against real images (sweeps, plots)"


def _sweep_item(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    kinds = {"sampler": str, "steps": checks.int_at_least(1), "guidance": checks.float_in(0)}
    if not sep or key not in kinds or not values:
        raise argparse.ArgumentTypeError(f"--sweep takes KEY=V1,V2,… with KEY in {list(kinds)}, got {text!r}")
    try:
        return key, checks.comma_list(kinds[key])(values)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: {e}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline", help="pipeline folder to evaluate")
    parser.add_argument("--data", default="datasets/shapes", help="real shards (DATA/train/*.tar, DATA/val/*.tar)")
    parser.add_argument("--split", default="val", help="real split whose images and captions are compared")
    parser.add_argument("--n", type=checks.int_at_least(2), default=2000,
                        help="images: the first n samples of the split, one generated per caption")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=None,
                        help="sampling steps; None: pipeline.json's")
    parser.add_argument("--sampler", default=None, help="sampler (ddim, dpmpp-2m, heun, …); None: pipeline.json's")
    parser.add_argument("--guidance", type=checks.float_in(0), default=None,
                        help="classifier-free guidance scale; None: pipeline.json's")
    parser.add_argument("--sweep", nargs="+", type=_sweep_item, default=None, metavar="KEY=V1,V2",
                        help="grid to run instead of one point, "
                             "e.g. --sweep guidance=1,2,4,7 steps=5,10,20,50 sampler=ddim,dpmpp-2m")
    parser.add_argument("--features", choices=("clip", "inception"), default="clip",
                        help="feature space: clip = FD in the project's CLIP image space (fd_clip, offline default); "
                             "inception = FID (needs --inception-weights and torch-fidelity)")
    parser.add_argument("--inception-weights", default=None,
                        help="local torch-fidelity weights-inception-2015-12-05-6726825d.pth "
                             "(for --features inception)")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP image encoder part for fd_clip and CLIP score "
                             "(None: PIPELINE/text_encoder/image_encoder)")
    parser.add_argument("--clip-score-model", default=None,
                        help="local transformers CLIP folder for the CLIP score (None: the project CLIP)")
    parser.add_argument("--probe", default="checkpoints/shapes/parts/probe",
                        help="shapes probe for adherence (shapes data only); trained on --data if missing")
    parser.add_argument("--probe-steps", type=checks.int_at_least(1), default=1500,
                        help="training steps of a missing probe (and two-object detector)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the reference points (train-vs-val floor, VAE reconstructions)")
    parser.add_argument("--cache-dir", default="checkpoints/fid_cache", help="cache of real-image features ('' = off)")
    parser.add_argument("--batch-size", type=checks.int_at_least(1), default=100,
                        help="images sampled / featurized together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of KID's subsets")
    parser.add_argument("--out", default=None,
                        help="results JSON (None: PIPELINE/fid.json); a sweep adds OUT.csv and OUT_*.png plots")
    parser.add_argument("--device", default=None, help="torch device (None: cuda if available, else cpu)")


def check(args: argparse.Namespace) -> None:
    """Every flag that names something, before anything is loaded."""
    from ldm.diffusion.samplers import SAMPLERS

    samplers = ([args.sampler] if args.sampler else []) + dict(args.sweep or []).get("sampler", [])
    checks.one_of("--sampler" if not args.sweep else "--sampler/--sweep sampler=", samplers, SAMPLERS)
    if args.features == "inception":  # a missing or unsuitable weights file is named first, as it is the rarer fix
        from ldm.evaluation.fid import inception_features

        inception_features(args.inception_weights)
    checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    checks.shard_dataset("--data", args.data, [args.split] + ([] if args.no_references else
                                                             ["train" if args.split != "train" else "val"]))
    if args.image_encoder is not None:
        checks.existing_dir("--image-encoder", args.image_encoder, "part folder")
    if args.clip_score_model is not None:
        checks.existing_dir("--clip-score-model", args.clip_score_model)
    if args.out is not None:
        checks.output_file("--out", args.out, (".json",))
    args.device = checks.torch_device("--device", args.device)


def run(args: argparse.Namespace) -> int:
    check(args)
    from ldm.evaluation import sweep
    from ldm.evaluation.evaluate import evaluate_pipeline, save_evaluation

    result = evaluate_pipeline(
        args.pipeline, args.data, args.split, args.n, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
        grid=dict(args.sweep or []), features=args.features, inception_weights=args.inception_weights,
        image_encoder=args.image_encoder, clip_score_model=args.clip_score_model, probe=args.probe,
        probe_steps=args.probe_steps, references=not args.no_references, cache_dir=args.cache_dir or None,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        on_row=lambda row: print(sweep.format_table([row]).splitlines()[-1], flush=True))
    cached = "real features cached" if result["real_features_cached"] else "real features computed"
    print(f"\n{result['metric']} of {args.pipeline} vs {args.n} real '{args.split}' images of {args.data} ({cached}):")
    print(sweep.format_table(result["results"], result["references"]))
    out = args.out or f"{args.pipeline}/fid.json"
    written = save_evaluation(result, out, sweep_outputs=bool(args.sweep))
    print("wrote " + ", ".join(map(str, written)))
    return 0
