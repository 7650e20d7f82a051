"""``ldm fid``: FD (FID or FD in CLIP space), KID, CLIP score and shapes adherence of a pipeline, offline.

Generates one image per caption of the first ``--n`` samples of the real split, compares feature statistics
(the real ones cached under ``--cache-dir``), prints a table beside the reference points (real train vs val,
VAE reconstructions) and writes JSON; ``--sweep`` runs a grid and adds a CSV and PNG plots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

HELP = "FD / FID, KID, CLIP score and prompt adherence of a pipeline against real images (sweeps, plots)"


def _sweep_item(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    kinds = {"sampler": str, "steps": int, "guidance": float}
    if not sep or key not in kinds or not values:
        raise argparse.ArgumentTypeError(f"--sweep takes KEY=V1,V2,… with KEY in {list(kinds)}, got {text!r}")
    try:
        return key, [kinds[key](v) for v in values.split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: {e}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline", help="pipeline folder to evaluate")
    parser.add_argument("--data", default="datasets/shapes", help="real shards (DATA/train/*.tar, DATA/val/*.tar)")
    parser.add_argument("--split", default="val", help="real split whose images and captions are compared")
    parser.add_argument("--n", type=int, default=2000,
                        help="images: the first n samples of the split, one generated per caption")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps; None: pipeline.json's")
    parser.add_argument("--sampler", default=None, help="sampler (ddim, dpmpp-2m, heun, …); None: pipeline.json's")
    parser.add_argument("--guidance", type=float, default=None,
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
    parser.add_argument("--probe-steps", type=int, default=1500, help="training steps of a missing probe")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the reference points (train-vs-val floor, VAE reconstructions)")
    parser.add_argument("--cache-dir", default="checkpoints/fid_cache", help="cache of real-image features ('' = off)")
    parser.add_argument("--batch-size", type=int, default=100, help="images sampled / featurized together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of KID's subsets")
    parser.add_argument("--out", default=None,
                        help="results JSON (None: PIPELINE/fid.json); a sweep adds OUT.csv and OUT_*.png plots")
    parser.add_argument("--device", default=None, help="torch device (None: cuda if available, else cpu)")


def folder_hash(path: Path) -> str:
    """sha256 over the names and bytes of a pipeline folder's configs and weights (what defines the model)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(f"{f.relative_to(path)}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _image_encoder_dir(args: argparse.Namespace) -> Path:
    return Path(args.image_encoder) if args.image_encoder else Path(args.pipeline) / "text_encoder" / "image_encoder"


def run(args: argparse.Namespace) -> int:
    from ldm.io import PartError

    try:
        return _run(args)
    except (PartError, ValueError) as e:
        print(f"ldm fid: error: {e}")
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from ldm.data.shards import read_info
    from ldm.diffusion.samplers import SAMPLERS
    from ldm.evaluation import fid, sweep
    from ldm.pipeline import TextToImagePipeline

    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.features == "inception":
        extractor = fid.inception_features(args.inception_weights)  # fails early, before anything is loaded
    pipe = TextToImagePipeline.from_pretrained(args.pipeline, device=device)
    if pipe.config.height != pipe.config.width:
        raise ValueError(f"ldm fid compares square images; the pipeline makes {pipe.config.height}x{pipe.config.width}")
    encoder_dir = _image_encoder_dir(args)
    image_encoder = None
    if args.features == "clip" or args.clip_score_model is None:
        image_encoder = fid.CLIPImageFeatures.from_part(encoder_dir).to(device)
    if args.features == "clip":
        extractor = image_encoder
    extractor = extractor.to(device)
    if args.clip_score_model:
        clip_metric = fid.hf_clip_score(args.clip_score_model)
    else:
        clip_metric = fid.project_clip_score(pipe.text_encoder, image_encoder.encoder)
    probe = None
    if read_info(args.data).get("name") == "shapes":
        from ldm.evaluation.shapes_probe import load_or_train_probe

        probe = load_or_train_probe(args.data, args.probe, steps=args.probe_steps).to(device)

    size, cache = pipe.config.height, (args.cache_dir or None)
    real = fid.load_split(args.data, args.split, args.n, size)
    real_features, hit = fid.cached_features(fid.real_cache_key(args.data, args.split, size, args.n, extractor), cache,
                                             lambda: fid.extract_features(extractor, real.images, args.batch_size))
    references = {} if args.no_references else sweep.reference_points(
        pipe, extractor, real, real_features, args.data, args.split, cache, args.batch_size, clip_metric)

    c = pipe.config
    grid_values = {"sampler": [args.sampler or c.sampler], "steps": [args.steps or c.steps],
                   "guidance": [c.guidance if args.guidance is None else args.guidance]}
    grid_values.update(dict(args.sweep or []))
    unknown = [s for s in grid_values["sampler"] if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {unknown}: use {list(SAMPLERS)}")
    rows = []
    for point in sweep.sweep_grid(grid_values):
        rows.append(sweep.evaluate_point(pipe, real, real_features, extractor, seed=args.seed,
                                         batch_size=args.batch_size, clip_metric=clip_metric, probe=probe, **point))
        print(sweep.format_table(rows[-1:]).splitlines()[-1], flush=True)

    name = fid.metric_name(extractor)
    print(f"\n{name} of {args.pipeline} vs {args.n} real '{args.split}' images of {args.data} "
          f"({'real features cached' if hit else 'real features computed'}):")
    print(sweep.format_table(rows, references))
    out = Path(args.out) if args.out else Path(args.pipeline) / "fid.json"
    result = {"pipeline": str(args.pipeline), "pipeline_hash": folder_hash(Path(args.pipeline)), "data": str(args.data),
              "split": args.split, "n": args.n, "features": args.features, "metric": name,
              "extractor_hash": fid.extractor_fingerprint(extractor),
              "image_encoder": str(encoder_dir) if image_encoder is not None else None,
              "clip_score_model": args.clip_score_model or "project CLIP (text_encoder + image_encoder)",
              "seed": args.seed, "real_features_cached": hit, "references": references, "results": rows,
              "wall_seconds": round(time.perf_counter() - start, 2)}
    if len(rows) == 1:
        result.update({k: v for k, v in rows[0].items() if k not in result})  # metric values at the top level
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if args.sweep:
        csv_path = sweep.write_csv(rows, out.with_suffix(".csv"))
        plots = sweep.plot_sweep(rows, out.with_suffix(""), references)
        print(f"wrote {csv_path}" + "".join(f", {p}" for p in plots))
    return 0
