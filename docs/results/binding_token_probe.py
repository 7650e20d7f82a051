"""Where a text encoder binds attributes (docs/results/binding.md): held-out linear probes on its token states.

For two-object prompts ("a C1 S1 REL a C2 S2", "a C1 S1 WHERE1 and a C2 S2 WHERE2", ``pair_eval_prompts``):
does the state at each shape word know that object's colour, and the state at each colour word (its last BPE
piece, just before the shape) that object's shape? A logistic regression on standardised states, trained on
3000 prompts (seed 1, both objects pooled), scored per object on 500 others (seed 2).

    PYTHONPATH=$PWD python docs/results/binding_token_probe.py PATH/TO/text_encoder
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ldm.data.shapes import COLORS, SHAPES, pair_eval_prompts
from ldm.io import load_part

COLOR_NAMES = list(COLORS)


def states(te: torch.nn.Module, n: int, seed: int, probe: str) -> tuple[torch.Tensor, ...]:
    """Token states and labels of both objects: ``probe="color"`` reads the shape word's state and labels it with
    the object's colour; ``"shape"`` the colour word's state labelled with the shape. Returns (X1, y1, X2, y2)."""
    items = pair_eval_prompts(n, seed)
    ids, mask = te.tokenize([p for p, _ in items])
    with torch.no_grad():
        tokens, _ = te(ids, mask)
    shape_pieces = {te.tokenizer.encode([s])[0] for s in SHAPES}  # one BPE piece each
    key, vocab = ("color", COLOR_NAMES) if probe == "color" else ("shape", list(SHAPES))
    xs, ys = ([], []), ([], [])
    for i, (prompt, target) in enumerate(items):
        where = [j for j, tok in enumerate(ids[i].tolist()) if (tok,) in shape_pieces]
        assert len(where) == 2, (prompt, where)
        if probe != "color":
            where = [j - 1 for j in where]
        for k in (0, 1):
            xs[k].append(tokens[i, where[k]])
            ys[k].append(vocab.index(target["objects"][k][key]))
    return torch.stack(xs[0]), torch.tensor(ys[0]), torch.stack(xs[1]), torch.tensor(ys[1])


def probe_accuracy(te: torch.nn.Module, probe: str) -> tuple[float, float]:
    """Held-out accuracy (%) of the first and the second object's label."""
    a1, b1, a2, b2 = states(te, 3000, 1, probe)
    x, y = torch.cat([a1, a2]), torch.cat([b1, b2])
    t1, u1, t2, u2 = states(te, 500, 2, probe)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    for _ in range(500):
        opt.zero_grad()
        F.cross_entropy(lin((x - mu) / sd), y).backward()
        opt.step()

    def acc(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((lin((a - mu) / sd).argmax(1) == b).float().mean()) * 100

    return acc(t1, u1), acc(t2, u2)


if __name__ == "__main__":
    torch.manual_seed(0)
    encoder = load_part(sys.argv[1], kind="text_encoder").eval()
    (c1, c2), (s1, s2) = probe_accuracy(encoder, "color"), probe_accuracy(encoder, "shape")
    print(f"{sys.argv[1]}: shape token -> its colour: first {c1:.1f} %, second {c2:.1f} %; "
          f"colour token -> its shape: first {s1:.1f} %, second {s2:.1f} %")
