"""``ldm guidance``: classifier guidance vs classifier-free guidance vs both on shapes (ldm.evaluation.conditional)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldm.cli import checks

HELP = "compare classifier guidance, classifier-free guidance and both on shapes (adherence and FD-CLIP)"


def pairs(text: str) -> list[tuple[float, float]]:
    """"2:1,4:4" -> [(2, 1), (4, 4)] (CFG w : classifier s, both >= 0)."""
    number = checks.float_in(0)
    out = []
    for item in text.split(","):
        w, sep, s = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not W:S (e.g. 2:4)")
        out.append((number(w), number(s)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="shapes pipeline folder")
    parser.add_argument("--classifier", required=True, help="noisy-latent classifier part (trained on its latents)")
    parser.add_argument("--probe", required=True, help="shapes probe part (ldm.evaluation.shapes_probe)")
    parser.add_argument("--data", required=True, help="shapes dataset folder (real images for FD)")
    parser.add_argument("--cache", default=None, help="labelled latent cache: also measure the classifier's accuracy")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP image tower for FD (default: the pipeline's text_encoder/image_encoder)")
    parser.add_argument("--n", type=checks.int_at_least(2), default=300, help="images per row")
    parser.add_argument("--cg-scales", type=checks.comma_list(checks.float_in(0)), default=[1, 3, 10, 30],
                        help="classifier scales s of CG alone (s = 0, the unconditional model, is always added)")
    parser.add_argument("--cfg-scales", type=checks.comma_list(checks.float_in(0)), default=[1, 2, 4],
                        help="CFG weights w of CFG alone")
    parser.add_argument("--both", type=pairs, default=[(1, 3), (1, 10), (2, 3), (2, 10), (4, 3), (4, 10)],
                        help="W:S pairs of CFG+CG")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=20, help="sampling steps")
    parser.add_argument("--sampler", default="dpmpp-2m", help="sampler (ldm generate --help lists them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and noise")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
    from ldm.diffusion.samplers import SAMPLERS

    checks.one_of("--sampler", [args.sampler], SAMPLERS)
    for flag, path, what in (("--pipeline", args.pipeline, "pipeline folder"), ("--classifier", args.classifier,
                             "part folder"), ("--probe", args.probe, "part folder"), ("--cache", args.cache, "cache")):
        if path is not None:
            checks.existing_dir(flag, path, what)
    checks.shard_dataset("--data", args.data, ["train", "val"])
    if args.out:
        checks.output_file("--out", args.out, (".json",))
    from ldm.evaluation import conditional
    from ldm.evaluation.fid import CLIPImageFeatures
    from ldm.evaluation.shapes_probe import load_probe
    from ldm.generation import load_classifier
    from ldm.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    classifier = load_classifier(args.classifier, pipe)
    probe = load_probe(args.probe)
    encoder = args.image_encoder or Path(args.pipeline) / "text_encoder" / "image_encoder"
    extractor = CLIPImageFeatures.from_part(encoder)
    result = {}
    if args.cache:
        accuracy = conditional.classifier_accuracy(classifier, args.cache, pipe.schedule)
        print(conditional.format_accuracy(accuracy))
        result["classifier_accuracy"] = accuracy
    result.update(conditional.compare_guidance(pipe, probe, classifier, extractor, args.data, args.n, args.cg_scales,
                                               args.cfg_scales, args.both, args.steps, args.sampler, args.seed))
    print(conditional.format_table(result["rows"]))
    print(f"FD-CLIP real train vs real val (n={args.n}): {result['fd_clip_real_train_vs_val']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
