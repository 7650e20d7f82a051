"""``ldm adherence``: how often a shapes pipeline draws the colour, shape and position it was asked for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldm.cli import checks

HELP = ("measure prompt adherence of a shapes pipeline: colour/shape/position of one object (the shapes probe) and "
        "two objects' colours, shapes and relation (the two-object detector)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline", help="pipeline folder to evaluate")
    parser.add_argument("--probe", default="checkpoints/shapes/parts/probe",
                        help="shapes probe part; trained on --data and saved there if it does not exist yet")
    parser.add_argument("--data", default="datasets/shapes", help="shapes shards (only used to train a missing probe)")
    parser.add_argument("--probe-steps", type=checks.int_at_least(1), default=1500,
                        help="training steps of a missing probe")
    parser.add_argument("--detector", default=None,
                        help="two-object detector part (default: PROBE/pair_detector); "
                             "trained there if it does not exist")
    parser.add_argument("--detector-steps", type=checks.int_at_least(1), default=None,
                        help="training steps of a missing detector (default: the detector's own)")
    parser.add_argument("--n", type=checks.int_at_least(1), default=200,
                        help="number of prompts (balanced over colours, shapes, positions)")
    parser.add_argument("--pair-n", type=checks.int_at_least(0), default=200,
                        help="number of two-object prompts (random colours, shapes, relations or cells); "
                             "0: no two-object mode")
    parser.add_argument("--steps", type=checks.comma_list(checks.int_at_least(1)), default=[20],
                        help="sampling steps; a comma list sweeps (e.g. 5,10,20,50)")
    parser.add_argument("--guidance", type=checks.comma_list(checks.float_in(0)), default=[4.0],
                        help="guidance scales; a comma list sweeps (e.g. 1,2,4,7)")
    parser.add_argument("--sampler", type=checks.comma_list(str), default="dpmpp-2m",
                        help="sampler name(s), comma-separated to sweep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise")
    parser.add_argument("--batch-size", type=checks.int_at_least(1), default=100, help="images sampled together")
    parser.add_argument("--grid", default=None, help="also write a grid PNG of the first 40 prompts' images (4 each) "
                                                     "here")
    parser.add_argument("--pair-grid", default=None,
                        help="also write a grid PNG of the first 40 two-object prompts' images (4 each) here")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: <pipeline>/adherence.json)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="load a pipeline whose parts were not trained together (a warning instead of an error)")


def check(args: argparse.Namespace) -> None:
    """Every flag that names something, before anything is loaded."""
    from ldm.diffusion.samplers import SAMPLERS

    checks.one_of("--sampler", args.sampler, SAMPLERS)
    checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    if not (Path(args.probe) / "model.safetensors").is_file():  # a probe will be trained on --data
        checks.shard_dataset("--data (to train the missing --probe)", args.data, ["train", "val"])
    if args.out is not None:
        checks.output_file("--out", args.out, (".json",))
    for flag, value in (("--grid", args.grid), ("--pair-grid", args.pair_grid)):
        if value is not None:
            checks.output_file(flag, value, checks.IMAGE_SUFFIXES)


def run(args: argparse.Namespace) -> int:
    check(args)
    from ldm.evaluation.adherence import format_table, sweep_adherence
    from ldm.evaluation.shapes_probe import load_or_train_probe
    from ldm.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.pipeline, allow_mismatch=args.allow_mismatch)
    probe = load_or_train_probe(args.data, args.probe, steps=args.probe_steps)
    detector = None
    if args.pair_n:
        from ldm.evaluation.pair_detector import DETECTOR_DIR, load_or_train_detector

        steps = {} if args.detector_steps is None else {"steps": args.detector_steps}
        detector = load_or_train_detector(args.detector or Path(args.probe) / DETECTOR_DIR,
                                          val_dir=args.data if Path(args.data).is_dir() else None, **steps)
    rows = sweep_adherence(pipe, probe, args.steps, args.guidance, args.sampler, detector=detector, pair_n=args.pair_n,
                           n=args.n, seed=args.seed, batch_size=args.batch_size)
    print(format_table(rows))
    out = Path(args.out) if args.out else Path(args.pipeline) / "adherence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pipeline": str(args.pipeline), "n": args.n, "pair_n": args.pair_n if detector else 0,
                               "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    from ldm.data.shapes import eval_prompts, pair_eval_prompts
    from ldm.evaluation.adherence import GRID_PROMPTS

    for path, prompts in ((args.grid, lambda: eval_prompts(args.n, args.seed)),
                          (args.pair_grid, lambda: pair_eval_prompts(max(args.pair_n, 1), args.seed))):
        if path:
            _grid(pipe, [p for p, _ in prompts()][:GRID_PROMPTS], args, path)
    return 0


def _grid(pipe, prompts: list[str], args: argparse.Namespace, path: str) -> None:
    """Four images per prompt (one row each) at the first sweep point, with the prompts in PATH.txt beside it."""
    from ldm.evaluation.adherence import GRID_IMAGES_PER_PROMPT
    from ldm.visual import image_grid

    images = pipe(prompts, steps=args.steps[0], guidance=args.guidance[0], sampler=args.sampler[0],
                  seed=args.seed, n_per_prompt=GRID_IMAGES_PER_PROMPT, progress=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows=len(prompts), scale=4, row_labels=prompts).save(path)
    Path(path).with_suffix(".txt").write_text("\n".join(prompts) + "\n")
    print(f"wrote grid {path} (rows = prompts in {Path(path).with_suffix('.txt')})")
