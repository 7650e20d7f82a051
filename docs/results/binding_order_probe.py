"""Do the token states a denoiser reads know which colour is on top? (docs/results/binding.md §10)

MLP probes (one hidden layer of 256) on relation prompts ("a C1 S1 REL a C2 S2", ``pair_eval_prompts``; 3,000
to train, seed 1, 500 held out, seed 2): from the state at each object's shape word, at the end-of-text token
and from the pooled embedding, predict the relation (4 classes) and the colour of the object on top / on the left
(10 classes: C1 for "above" / "left of", C2 otherwise). Given a pipeline, the U-Net's context-refiner output too.

    PYTHONPATH=$PWD .venv/bin/python docs/results/binding_order_probe.py RUN/parts/text_encoder   # or RUN/pipeline
"""
import sys

import torch
import torch.nn.functional as F

from ldm.data.shapes import COLORS, RELATIONS, SHAPES, pair_eval_prompts
from ldm.io import load_part
from ldm.pipeline import TextToImagePipeline

if sys.argv[1].rstrip("/").endswith("text_encoder"):
    encoder, refiner = load_part(sys.argv[1], kind="text_encoder").eval(), None
else:
    pipe = TextToImagePipeline.from_pretrained(sys.argv[1])
    encoder, refiner = pipe.text_encoder.eval(), getattr(pipe.denoiser, "context_refiner", None)
shape_pieces = {encoder.tokenizer.encode([s])[0] for s in SHAPES}
COLOUR_NAMES = list(COLORS)


def features(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    items = [item for item in pair_eval_prompts(n, seed) if item[1]["template"] == "relation"]
    ids, mask = encoder.tokenize([p for p, _ in items])
    with torch.no_grad():
        tokens, pooled = encoder(ids, mask)
        refined = refiner(tokens, mask[:, None, None, :].bool()) if refiner is not None else None
    where = torch.tensor([[j for j, tok in enumerate(row) if (tok,) in shape_pieces] for row in ids.tolist()])
    rows = torch.arange(len(items))
    out = {"object 1 shape word": tokens[rows, where[:, 0]], "object 2 shape word": tokens[rows, where[:, 1]],
           "end-of-text token": tokens[rows, mask.sum(1) - 1], "pooled embedding": pooled}
    if refined is not None:
        out |= {"refined object 1 shape word": refined[rows, where[:, 0]],
                "refined object 2 shape word": refined[rows, where[:, 1]]}
    relation = torch.tensor([RELATIONS.index(t["relation"]) for _, t in items])
    first = torch.tensor([COLOUR_NAMES.index(t["objects"][0 if t["relation"] in ("above", "left of") else 1]["color"])
                          for _, t in items])
    return out, relation, first


def probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, classes: int) -> float:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, classes))
    opt = torch.optim.Adam(mlp.parameters(), 1e-2)
    for _ in range(400):
        opt.zero_grad()
        F.cross_entropy(mlp((x - mu) / sd), y).backward()
        opt.step()
    return float((mlp((xt - mu) / sd).argmax(1) == yt).float().mean()) * 100


torch.manual_seed(0)
train, test = features(6000, 1), features(1000, 2)
for label, k, classes in (("relation", 1, 4), ("colour on top / left", 2, 10)):
    for name in train[0]:
        print(f"{label}: {name}: {probe(train[0][name], train[k], test[0][name], test[k], classes):.1f} %")
