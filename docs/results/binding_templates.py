"""Two-object adherence of a pipeline split by prompt template (docs/results/binding.md, section 4).

The "relation" prompts of ``pair_eval_prompts`` match a training template word for word; the "placed" ones
("a C1 S1 WHERE1 and a C2 S2 WHERE2") lack the sizes that the dataset's ``both_placed`` captions always name.
Scores the same placed prompts as they are and with a size before each colour (seeded), to see what the
missing words cost.

    PYTHONPATH=$PWD python docs/results/binding_templates.py PIPELINE DETECTOR [N]
"""

from __future__ import annotations

import random
import re
import sys

from ldm.data.shapes import SIZES, pair_eval_prompts
from ldm.evaluation.pair_detector import load_detector, pair_adherence
from ldm.pipeline import TextToImagePipeline


def with_sizes(prompt: str, target: dict, rng: random.Random) -> str:
    """``prompt`` with a random size word before each object's colour ("a large red circle ...")."""
    for obj in target["objects"]:
        words = f" {obj['color']} {obj['shape']}"
        prompt = prompt.replace(words, f" {rng.choice(list(SIZES))}{words}", 1)
    return re.sub(r"\ban (?=(small|large) )", "a ", prompt)


if __name__ == "__main__":
    pipe = TextToImagePipeline.from_pretrained(sys.argv[1])
    detector = load_detector(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    items = pair_eval_prompts(n, 0)
    rng = random.Random(0)
    groups = {"relation": [(p, t) for p, t in items if t["template"] == "relation"],
              "placed": [(p, t) for p, t in items if t["template"] == "placed"]}
    groups["placed + sizes"] = [(with_sizes(p, t, rng), t) for p, t in groups["placed"]]
    print(groups["placed + sizes"][0][0])
    for name, group in groups.items():
        images = pipe.generate([p for p, _ in group], steps=20, guidance=4.0, sampler="dpmpp-2m", seed=0,
                               batch_size=100, progress=False)
        scores = pair_adherence(detector.detect(images), [t for _, t in group])
        print(name, {k: round(v * 100, 1) if k != "n" else v for k, v in scores.items()}, flush=True)
