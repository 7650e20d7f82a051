"""Two-object adherence of a pipeline split by prompt template, and the first detections (docs/results/binding.md §7).

    python docs/results/binding_breakdown.py RUN   # RUN = a demo's checkpoints/shapes (pipeline/, parts/probe/)
"""
import sys

from ldm.data.shapes import pair_eval_prompts
from ldm.evaluation.pair_detector import load_detector, pair_adherence
from ldm.pipeline import TextToImagePipeline

root = sys.argv[1]
pipe = TextToImagePipeline.from_pretrained(f"{root}/pipeline")
detector = load_detector(f"{root}/parts/probe/pair_detector")
prompts = pair_eval_prompts(200, 0)
images = pipe.generate([p for p, _ in prompts], steps=20, guidance=4.0, sampler="dpmpp-2m", seed=0, batch_size=100)
found = detector.detect(images)
for template in ("relation", "placed"):
    index = [i for i, (_, t) in enumerate(prompts) if t["template"] == template]
    scores = pair_adherence([found[i] for i in index], [prompts[i][1] for i in index])
    print(template, {k: round(v, 3) for k, v in scores.items()})
for i in range(6):
    print(prompts[i][0], "->", {c: (v["shape"], v.get("position")) for c, v in found[i].items()})
