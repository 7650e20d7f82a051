"""``ldm guidance``: classifier guidance vs classifier-free guidance vs both on shapes (ldm.evaluation.conditional)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "compare classifier guidance, classifier-free guidance and both on shapes (adherence and FD-CLIP)"


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def pairs(text: str) -> list[tuple[float, float]]:
    """"2:1,4:4" -> [(2, 1), (4, 4)] (CFG w : classifier s)."""
    out = []
    for item in text.split(","):
        w, sep, s = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not W:S (e.g. 2:4)")
        out.append((float(w), float(s)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="shapes pipeline folder")
    parser.add_argument("--classifier", required=True, help="noisy-latent classifier part (trained on its latents)")
    parser.add_argument("--probe", required=True, help="shapes probe part (ldm.evaluation.shapes_probe)")
    parser.add_argument("--data", required=True, help="shapes dataset folder (real images for FD)")
    parser.add_argument("--cache", default=None, help="labelled latent cache: also measure the classifier's accuracy")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP image tower for FD (default: the pipeline's text_encoder/image_encoder)")
    parser.add_argument("--n", type=int, default=300, help="images per row")
    parser.add_argument("--cg-scales", type=floats, default=[1, 2, 4, 8], help="classifier scales s of CG alone")
    parser.add_argument("--cfg-scales", type=floats, default=[1, 2, 4], help="CFG weights w of CFG alone")
    parser.add_argument("--both", type=pairs, default=[(2, 1), (2, 4), (4, 1), (4, 4)], help="W:S pairs of CFG+CG")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--sampler", default="dpmpp-2m", help="sampler")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and noise")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
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
