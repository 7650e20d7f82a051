"""Few-step students against their teacher on shapes: prompt adherence, FD and sampling time, same prompts and seeds.

    ldm bench lcm --teacher checkpoints/shapes/pipeline --model student=checkpoints/shapes/lcm/pipeline \\
        --model lcm-lora=checkpoints/shapes/lcm-lora/merged --probe checkpoints/shapes/parts/probe \\
        --data datasets/shapes --out checkpoints/bench/lcm.json

Rows: the teacher with DPM-Solver++ at ``--teacher-steps`` (guidance ``--guidance``, CFG batch), each ``--model``
with the ``lcm`` sampler at ``--student-steps`` (its pipeline.json's guidance: a w-conditioned student takes it as
an input, an LCM-LoRA samples at 1), and the teacher itself under the ``lcm`` sampler (no distillation: what the
sampler alone gives). Per row: single-object adherence (``ldm adherence``: ``--n`` balanced prompts read back by the
probe), FD in the project's CLIP image space against ``--fd-n`` val images with their captions (``ldm fid``), and
the wall and CPU seconds per image of a fixed ``--time-prompts`` batch, measured interleaved round by round
(``--rounds``, median) so that other processes on the machine slow every row alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ldm import table
from ldm.fastpath import cpu_model
from ldm.io import write_json
from ldm.pipeline import TextToImagePipeline
from ldm.table import percent


@dataclasses.dataclass
class Point:
    """One row: a pipeline sampled with one sampler, step count and guidance."""

    name: str
    pipe: TextToImagePipeline
    sampler: str
    steps: int
    guidance: float

    @property
    def label(self) -> str:
        return f"{self.name} / {self.sampler} / {self.steps}"

    @property
    def forwards(self) -> int:
        """Denoiser rows per image and step summed over steps: 2 per step with a CFG batch, else 1."""
        from ldm.diffusion.guidance import takes_guidance_scale

        cfg = self.guidance != 1.0 and not takes_guidance_scale(self.pipe.denoiser)
        return self.steps * (2 if cfg else 1)

    def generate(self, prompts: list[str], seed: int, batch_size: int) -> torch.Tensor:
        return self.pipe.generate(prompts, steps=self.steps, guidance=self.guidance, sampler=self.sampler, seed=seed,
                                  batch_size=batch_size, progress=False)


def time_points(points: list[Point], prompts: list[str], rounds: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per image of each point, interleaved round by round (one warm-up first)."""
    walls: dict[str, list[float]] = {p.label: [] for p in points}
    cpus: dict[str, list[float]] = {p.label: [] for p in points}
    for point in points:
        point.generate(prompts[:8], 0, batch_size)
    for _ in range(rounds):
        for point in points:
            wall, cpu = time.perf_counter(), time.process_time()
            point.generate(prompts, 0, batch_size)
            walls[point.label].append((time.perf_counter() - wall) / len(prompts))
            cpus[point.label].append((time.process_time() - cpu) / len(prompts))
    return {name: {"wall_s_per_image": statistics.median(walls[name]), "cpu_s_per_image": statistics.median(cpus[name])}
            for name in walls}


COLUMNS = [("name", "model", ""), ("sampler", "sampler", ""), ("steps", "steps", ""), ("guidance", "guid.", "g"),
           ("forwards", "U-Net rows/img", ""), ("color", "colour", percent("color")),
           ("shape", "shape", percent("shape")), ("position", "position", percent("position")),
           ("all_three", "all three", percent("all_three")), ("two_object", "two-object", ""),
           ("fd_clip", "FD-CLIP", ".2f"), ("clip_score", "CLIP score", ".1f"),
           ("wall_ms", "wall ms/img", ".2f"), ("cpu_ms", "CPU ms/img", ".2f"), ("speedup", "× vs teacher-20", ".1f")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ldm bench lcm`` / ``python -m ldm.bench.lcm``."""
    from ldm.cli import checks

    positive = checks.int_at_least(1)
    parser.add_argument("--teacher", required=True, help="the teacher pipeline folder")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PIPELINE",
                        help="a few-step pipeline to measure (repeat); sampled with lcm and its pipeline.json guidance")
    parser.add_argument("--probe", required=True, help="shapes probe part (ldm adherence's)")
    parser.add_argument("--data", required=True, help="shapes dataset folder (val split for FD)")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP image tower for FD (None: TEACHER/text_encoder/image_encoder)")
    parser.add_argument("--teacher-steps", type=checks.comma_list(positive), default=[4, 8, 20, 50],
                        help="DPM-Solver++ steps of the teacher (comma list)")
    parser.add_argument("--student-steps", type=checks.comma_list(positive), default=[1, 2, 4, 8],
                        help="lcm steps of each --model (comma list)")
    parser.add_argument("--guidance", type=checks.float_in(1), default=4.0, help="the teacher's CFG scale")
    parser.add_argument("--n", type=positive, default=200, help="adherence prompts")
    parser.add_argument("--fd-n", type=checks.int_at_least(0), default=200,
                        help="val images and captions for FD (0: skip FD)")
    parser.add_argument("--time-prompts", type=positive, default=64, help="images per timing run")
    parser.add_argument("--rounds", type=positive, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--time-only", action="store_true", help="measure sampling time only (no adherence, no FD)")
    parser.add_argument("--threads", type=positive, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=positive, default=100, help="images sampled together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise")
    parser.add_argument("--out", default="checkpoints/bench/lcm.json", help="JSON results file")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every row (see the module docstring); returns the JSON-able result with a Markdown ``table``."""
    torch.set_num_threads(args.threads)

    from ldm.data.shapes import eval_prompts
    from ldm.evaluation import fid
    from ldm.evaluation.adherence import measure_adherence
    from ldm.evaluation.shapes_probe import load_or_train_probe
    from ldm.evaluation.sweep import evaluate_point

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    teacher = TextToImagePipeline.from_pretrained(args.teacher)
    as_consistency = TextToImagePipeline.from_pretrained(args.teacher)
    as_consistency.config = dataclasses.replace(as_consistency.config, consistency_model=True)
    points = [Point("teacher", teacher, "dpmpp-2m", steps, args.guidance) for steps in args.teacher_steps]
    points.append(Point("teacher, no distillation", as_consistency, "lcm", 4, args.guidance))
    for spec in args.model:
        name, _, path = spec.partition("=")
        pipe = TextToImagePipeline.from_pretrained(path)
        points += [Point(name, pipe, "lcm", steps, pipe.config.guidance) for steps in args.student_steps]

    fd_n = 0 if args.time_only else args.fd_n
    probe = None if args.time_only else load_or_train_probe(args.data, args.probe)
    encoder_dir = Path(args.image_encoder or Path(args.teacher) / "text_encoder" / "image_encoder")
    extractor = fid.CLIPImageFeatures.from_part(encoder_dir) if fd_n else None
    clip_metric = fid.project_clip_score(teacher.text_encoder, extractor.encoder) if fd_n else None
    real = fid.load_split(args.data, "val", fd_n, teacher.config.height) if fd_n else None
    real_features = fid.extract_features(extractor, real.images, args.batch_size) if fd_n else None

    rows = []
    for point in points:
        row: dict[str, Any] = {"name": point.name, "sampler": point.sampler, "steps": point.steps,
                               "guidance": point.guidance, "forwards": point.forwards}
        rows.append(row)
        if args.time_only:
            continue
        scores = measure_adherence(point.pipe, probe, n=args.n, steps=point.steps, guidance=point.guidance,
                                   sampler=point.sampler, seed=args.seed, batch_size=args.batch_size)
        row.update({k: scores[k] for k in ("color", "shape", "position", "size", "all_three")})
        if fd_n:
            fd_row = evaluate_point(point.pipe, real, real_features, extractor, point.sampler, point.steps,
                                    point.guidance, seed=args.seed, batch_size=args.batch_size,
                                    clip_metric=clip_metric)
            row.update({k: fd_row[k] for k in ("fd_clip", "kid_clip", "clip_score") if k in fd_row})
        print(table.format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)

    prompts = [p for p, _ in eval_prompts(args.time_prompts, args.seed + 1)]
    times = time_points(points, prompts, args.rounds, args.batch_size)
    reference = next((times[p.label] for p in points if p.name == "teacher" and p.steps == 20), None)
    for point, row in zip(points, rows):
        t = times[point.label]
        row.update(wall_ms=1e3 * t["wall_s_per_image"], cpu_ms=1e3 * t["cpu_s_per_image"])
        if reference is not None:
            row["speedup"] = reference["wall_s_per_image"] / t["wall_s_per_image"]
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "threads": args.threads,
            "loadavg_end": os.getloadavg(), "args": vars(args), "rows": rows,
            "table": table.format_table(rows, COLUMNS, markdown=True),
            "wall_seconds": round(time.perf_counter() - start_wall, 1),
            "cpu_seconds": round(time.process_time() - start_cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = benchmark(args)
    print("\n" + result["table"])
    write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['wall_seconds']} s wall, load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
