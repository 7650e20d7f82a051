"""Two-object adherence of a pipeline split by prompt template, the first detections (docs/results/binding.md §7),
and where the two objects land (§10): per relation the row (above/below) or column (left/right) of the first
object -> the second's, and for the placed prompts whether each object sits in its named cell.

    python docs/results/binding_breakdown.py RUN [GUIDANCE]   # RUN: a demo run folder (pipeline/, parts/probe/)
"""
import collections
import sys

from ldm.data.shapes import POSITIONS, pair_eval_prompts
from ldm.evaluation.pair_detector import load_detector, pair_adherence
from ldm.pipeline import TextToImagePipeline

root = sys.argv[1]
guidance = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
pipe = TextToImagePipeline.from_pretrained(f"{root}/pipeline")
detector = load_detector(f"{root}/parts/probe/pair_detector")
prompts = pair_eval_prompts(200, 0)
images = pipe.generate([p for p, _ in prompts], steps=20, guidance=guidance, sampler="dpmpp-2m", seed=0, batch_size=100)
found = detector.detect(images)
for template in ("relation", "placed"):
    index = [i for i, (_, t) in enumerate(prompts) if t["template"] == template]
    scores = pair_adherence([found[i] for i in index], [prompts[i][1] for i in index])
    print(template, {k: round(v, 3) for k, v in scores.items()})
for i in range(6):
    print(prompts[i][0], "->", {c: (v["shape"], v.get("position")) for c, v in found[i].items()})

layouts = collections.defaultdict(collections.Counter)
cells = collections.Counter()
for f, (_, target) in zip(found, prompts):
    o1, o2 = target["objects"]
    if target["template"] == "relation":
        if o1["color"] in f and o2["color"] in f:
            axis = 1 if target["relation"] in ("above", "below") else 0  # row or column index
            a, b = POSITIONS[f[o1["color"]]["position"]][axis], POSITIONS[f[o2["color"]]["position"]][axis]
            layouts[target["relation"]][f"{a}->{b}"] += 1
        else:
            layouts[target["relation"]]["missing"] += 1
    else:
        for j, o in enumerate((o1, o2), 1):
            got = f.get(o["color"])
            cells[f"object {j} " + ("missing" if got is None else "in its cell" if got["position"] == o["position"]
                                    else "elsewhere")] += 1
for relation, counts in layouts.items():
    print(relation, dict(sorted(counts.items())))
print("placed:", dict(sorted(cells.items())))
