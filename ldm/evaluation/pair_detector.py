"""The two-object detector: for every colour of the shapes vocabulary, is an object of that colour in the image,
and if so, its shape, grid cell, size and box.

Each colour is a query ("is there a red object; what shape is it, where"), so a prompt's binding is read as "the
object of colour C1 has shape S1" and its relation from the two colours' boxes. The network: a CoordConv CNN
(RGB + x/y channels) down to a feature map at R/4; per colour a 1×1-conv heat map over it, whose spatial softmax
pools that colour's features and coordinates (a soft-argmax centre); heads shared by every colour read shape,
grid cell, size and box from the pooled features. A colour's presence logit is its heat map's maximum (plus a
learnt offset), so finding an object and saying it is there are one map.

It is trained on scenes rendered on the fly by ``ldm.data.shapes`` with exact labels: one to three objects of
distinct colours in any grid cells (not only the far-apart pairs of the dataset, so the layouts a failing
generator draws are read too), with the shapes probe's degradations (``shapes_probe.augment``). Validate it on
the real val images of a dataset (``evaluate_detector``) before trusting it on generations.
An exported part (``ldm.io``): ``save_part(detector, dir)`` / ``load_detector(dir)``; imports no Lightning.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.data import shapes as shapes_data
from ldm.data.images import decode_rgb
from ldm.data.shards import list_shards, read_shard
from ldm.evaluation.shapes_probe import augment, to_unit
from ldm.io import load_part, save_part, write_json

HEADS = ("shape", "position", "size")
DETECTOR_DIR = "pair_detector"  # where a probe part folder keeps its two-object detector (``PROBE/pair_detector``)
DEFAULT_STEPS = 600
POSITION_MARGIN = 0.1  # GenEval's POSITION_THRESHOLD: offsets within 0.1 × (sum of extents) count as none


@dataclass
class PairDetectorConfig:
    resolution: int = 32
    width: int = 24
    colors: list[str] = field(default_factory=lambda: list(shapes_data.COLORS))
    shapes: list[str] = field(default_factory=lambda: list(shapes_data.SHAPES))
    positions: list[str] = field(default_factory=lambda: list(shapes_data.POSITIONS))
    sizes: list[str] = field(default_factory=lambda: list(shapes_data.SIZES))

    def vocab(self, head: str) -> list[str]:
        return {"color": self.colors, "shape": self.shapes, "position": self.positions, "size": self.sizes}[head]


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PairDetector(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] → per colour: presence logit, shape / cell / size logits, box.

    ``forward`` returns ``presence`` (B, K), ``shape`` (B, K, 5), ``position`` (B, K, 9), ``size`` (B, K, 2),
    ``box`` (B, K, 4) as centre x, centre y, width, height (fractions of the side) and ``heat`` (B, K, h·w),
    the colours' heat-map logits over the R/4 feature map.
    """

    config_class = PairDetectorConfig

    def __init__(self, config: PairDetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.metrics: dict[str, Any] = {}
        w, r = config.width, config.resolution
        if r % 4:
            raise ValueError(f"PairDetector resolution must be divisible by 4, got {r}")
        # R/2, R/4, then two convolutions at R/4 (the second dilated) so a cell sees a whole large shape
        self.features = nn.Sequential(_conv(5, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),
                                      _conv(2 * w, 2 * w, dilation=2))
        k, c = len(config.colors), 2 * w
        self.heat = nn.Conv2d(c + 2, k, 1)
        self.presence = nn.Parameter(torch.full((k,), -2.0))  # added to each colour's heat-map maximum
        self.heads = nn.ModuleDict({h: nn.Linear(c + 2, len(config.vocab(h))) for h in HEADS})
        self.box = nn.Linear(c + 2, 4)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)
        h = r // 4
        cy, cx = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(h) + 0.5) / h, indexing="ij")
        self.register_buffer("cells", torch.stack([cx, cy]).reshape(2, -1), persistent=False)  # (2, h·h) in [0, 1]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check (B, 3, H, W) in [-1, 1] and resample to the detector's resolution (area for downsizing)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"PairDetector expects images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        images = images.to(self.coords.device, torch.float32)
        r = self.config.resolution
        if images.shape[-2:] != (r, r):
            mode = "area" if images.shape[-1] > r else "bilinear"
            corners = {} if mode == "area" else {"align_corners": False}
            images = F.interpolate(images, size=(r, r), mode=mode, **corners)
        return images

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(images)
        fmap = self.features(torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1))
        b, c = fmap.shape[:2]
        flat = torch.cat([fmap.flatten(2), self.cells.expand(b, -1, -1)], dim=1)  # (B, C + 2, h·w)
        heat = torch.einsum("kc,bcn->bkn", self.heat.weight[:, :, 0, 0], flat) + self.heat.bias[None, :, None]
        pooled = torch.einsum("bkn,bcn->bkc", heat.softmax(-1), flat)  # per colour: its features + soft-argmax centre
        out = {"presence": heat.amax(-1) + self.presence, "heat": heat}
        out.update({h: head(pooled) for h, head in self.heads.items()})
        raw = self.box(pooled)
        centre = pooled[..., -2:] + 0.1 * torch.tanh(raw[..., :2])
        out["box"] = torch.cat([centre, torch.sigmoid(raw[..., 2:])], dim=-1)
        return out

    @torch.no_grad()
    def detect(self, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, dict[str, Any]]]:
        """Per image, the colours it holds: ``{colour: {"p", "shape", "position", "size", "box" (x0, y0, x1, y1)}}``
        for every colour whose presence probability is above 0.5."""
        was_training = self.training
        self.eval()
        found: list[dict[str, dict[str, Any]]] = []
        cfg = self.config
        for chunk in images.split(batch_size):
            out = self(chunk)
            p = out["presence"].sigmoid()
            labels = {h: out[h].argmax(-1) for h in HEADS}
            for i in range(len(chunk)):
                objects = {}
                for k in torch.nonzero(p[i] > 0.5).flatten().tolist():
                    cx, cy, bw, bh = out["box"][i, k].tolist()
                    objects[cfg.colors[k]] = {"p": round(float(p[i, k]), 4),
                                              **{h: cfg.vocab(h)[int(labels[h][i, k])] for h in HEADS},
                                              "box": (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)}
                found.append(objects)
        self.train(was_training)
        return found


# ---- relations and scoring ---------------------------------------------------------------------------------------
def relations_between(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_MARGIN) -> set[str]:
    """The relations of object A to object B ("left of", "right of", "above", "below") from their boxes
    (x0, y0, x1, y1; y down), as GenEval's position check (Ghosh et al. 2023, sec. 3.1): the centre offset
    shrunk by ``margin`` × (sum of the two extents) along each axis; a relation holds when the shrunk offset
    along its axis is more than half the length of the full offset (its direction within 60° of the axis).
    Diagonal layouts hold two relations; touching or overlapping centres none."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    extent = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    revised = [math.copysign(max(abs(o) - margin * e, 0.0), o) for o, e in zip(offset, extent)]
    norm = math.hypot(*offset)
    if norm == 0 or all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = revised[0] / norm, revised[1] / norm
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


PAIR_KEYS = ("present", "bound", "relation", "all")


def pair_adherence(detections: Sequence[dict[str, dict[str, Any]]], targets: Sequence[dict[str, Any]]
                   ) -> dict[str, float]:
    """How often the detections show what two-object prompts asked for.

    ``targets``: ``{"objects": [{"color", "shape"(, "position")}, ×2], "relation"}`` each (as from
    ``shapes.pair_eval_prompts``). ``present``: both colours found; ``bound``: both found with their shapes;
    ``relation``: both found and the first's box stands in the relation to the second's
    (:func:`relations_between`); ``all``: all three. ``cells``: both objects in their named grid cells, over the
    targets that name cells (absent when none do); ``extra``: another colour found too (a diagnostic).
    """
    if len(detections) != len(targets):
        raise ValueError(f"pair_adherence: {len(detections)} detections for {len(targets)} targets")
    n = len(targets)
    if n == 0:
        raise ValueError("pair_adherence needs at least one target")
    counts = dict.fromkeys((*PAIR_KEYS, "extra"), 0)
    cells, placed = 0, 0
    for found, target in zip(detections, targets):
        (o1, o2), colours = target["objects"], [o["color"] for o in target["objects"]]
        present = all(c in found for c in colours)
        bound = present and all(found[o["color"]]["shape"] == o["shape"] for o in (o1, o2))
        relation = present and target["relation"] in relations_between(found[o1["color"]]["box"],
                                                                       found[o2["color"]]["box"])
        for key, ok in (("present", present), ("bound", bound), ("relation", relation),
                        ("all", bound and relation), ("extra", bool(set(found) - set(colours)))):
            counts[key] += ok
        if "position" in o1:
            placed += 1
            cells += present and all(found[o["color"]]["position"] == o["position"] for o in (o1, o2))
    result: dict[str, float] = {"n": n, **{k: v / n for k, v in counts.items()}}
    if placed:
        result["cells"] = cells / placed
    return result


# templates of the dataset's two-object captions that name where the objects are (a relation or both cells)
PLACED_PAIR_TEMPLATES = frozenset({"relation", "both_placed", "terse_pair"})


def pair_targets(metas: Sequence[dict[str, Any]]) -> tuple[list[int], list[dict[str, Any]]]:
    """Indices and :func:`pair_adherence` targets of the two-object shapes samples whose caption names the
    objects' relation or cells (the relation of a placed caption is the one its cells imply)."""
    index, targets = [], []
    for i, meta in enumerate(metas):
        objects = meta.get("objects") or []
        template = meta.get("template")
        if len(objects) != 2 or template not in PLACED_PAIR_TEMPLATES:
            continue
        keys = ("color", "shape") if template == "relation" else ("color", "shape", "position")
        index.append(i)
        targets.append({"objects": [{k: o[k] for k in keys} for o in objects],
                        "relation": shapes_data.relation_of(*objects)})
    return index, targets


def caption_pair_adherence(detector: PairDetector, images: torch.Tensor, metas: Sequence[dict[str, Any]]
                           ) -> dict[str, float]:
    """Two-object adherence of images generated from the shapes captions of ``metas`` (uint8 or [-1, 1]):
    ``pair_n`` and ``pair_{present,bound,relation,all,cells,extra}`` over the captions :func:`pair_targets`
    picks."""
    index, targets = pair_targets(metas)
    if not index:
        return {"pair_n": 0}
    x = images[index]
    x = to_unit(x) if x.dtype == torch.uint8 else x
    scores = pair_adherence(detector.detect(x), targets)
    return {"pair_n": scores.pop("n"), **{f"pair_{k}": v for k, v in scores.items()}}


# ---- training scenes ---------------------------------------------------------------------------------------------
def detector_scene(rng: random.Random, max_objects: int = 3) -> dict[str, Any]:
    """A scene for training the detector: 1 to ``max_objects`` objects (two most often) of distinct colours in
    distinct grid cells of any layout, never overlapping, on a background far from every colour in it.

    The two constraints are independent (the background rules only the colours out, overlap only the
    placement), so each is met by its own rejection loop: the same scenes as rejecting whole scenes, ~10x
    fewer draws (three objects rarely fit the grid)."""
    n = rng.choice([1, 2, 2, 2, 3][: 3 + 2 * (max_objects >= 3)] if max_objects >= 2 else [1])
    while True:
        colours = rng.sample(_COLOUR_NAMES, n)
        backgrounds = shapes_data.allowed_backgrounds(colours)
        if backgrounds:
            break
    while True:
        cells, sizes = rng.sample(_POSITION_NAMES, n), [rng.choice(_SIZE_NAMES) for _ in range(n)]
        if _surely_overlapping(cells, sizes):  # whatever the jitter: no need to draw it
            continue
        objects = [shapes_data.place_object(rng, rng.choice(shapes_data.SHAPES), c, size, p)
                   for c, size, p in zip(colours, sizes, cells)]
        if all(not shapes_data.overlaps(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            return {"objects": objects, "background": rng.choice(backgrounds)}


def _surely_overlapping(cells: Sequence[str], sizes: Sequence[str]) -> bool:
    """Whether two of these objects overlap (``shapes.overlaps``) wherever the jitter puts their centres."""
    return any(_pair_surely_overlaps(cells[i], sizes[i], cells[j], sizes[j])
               for i in range(len(cells)) for j in range(i + 1, len(cells)))


@functools.cache
def _pair_surely_overlaps(cell_a: str, size_a: str, cell_b: str, size_b: str) -> bool:
    """``shapes.overlaps`` of two objects with their centres pushed apart by the most the jitter can move them
    (``JITTER`` along x and y each); cached: 9 cells x 2 sizes each side."""
    (xa, ya), (xb, yb) = (shapes_data.cell_center(c, shapes_data.SIZES[s]) for c, s in ((cell_a, size_a),
                                                                                           (cell_b, size_b)))
    push = math.sqrt(2) * shapes_data.JITTER / max(math.dist((xa, ya), (xb, yb)), 1e-12)
    a = {"center": [xa - push * (xb - xa), ya - push * (yb - ya)], "radius": shapes_data.SIZES[size_a]}
    b = {"center": [xb + push * (xb - xa), yb + push * (yb - ya)], "radius": shapes_data.SIZES[size_b]}
    return shapes_data.overlaps(a, b)


_COLOUR_NAMES, _POSITION_NAMES = list(shapes_data.COLORS), list(shapes_data.POSITIONS)
_SIZE_NAMES = list(shapes_data.SIZES)


def scene_targets(scenes: Sequence[dict[str, Any]], config: PairDetectorConfig, shift: tuple[float, float] = (0, 0)
                  ) -> dict[str, torch.Tensor]:
    """Label tensors of scenes: ``presence`` (B, K) float, ``shape``/``position``/``size`` (B, K) class indices
    (−100 where the colour is absent), ``box`` (B, K, 4) centre/size; ``shift``: how far the content moved
    (fractions of the side)."""
    k = len(config.colors)
    index = {h: {v: i for i, v in enumerate(config.vocab(h))} for h in ("color", *HEADS)}
    presence, box = [[0.0] * k for _ in scenes], [[[0.0] * 4 for _ in range(k)] for _ in scenes]
    labels = {h: [[-100] * k for _ in scenes] for h in HEADS}
    for i, scene in enumerate(scenes):  # plain lists, one tensor each at the end
        for obj in scene["objects"]:
            c = index["color"][obj["color"]]
            presence[i][c] = 1.0
            for h in HEADS:
                labels[h][i][c] = index[h][obj[h]]
            x0, y0, x1, y1 = shapes_data.object_box(obj)
            box[i][c] = [(x0 + x1) / 2 + shift[0], (y0 + y1) / 2 + shift[1], x1 - x0, y1 - y0]
    return {"presence": torch.tensor(presence), "box": torch.tensor(box),
            **{h: torch.tensor(v, dtype=torch.long) for h, v in labels.items()}}


def render_batch(scenes: Sequence[dict[str, Any]], resolution: int) -> torch.Tensor:
    """uint8 (B, 3, R, R) renders of scenes."""
    return torch.from_numpy(np.stack([np.asarray(shapes_data.render(s, resolution)) for s in scenes])
                            ).permute(0, 3, 1, 2).contiguous()


def detector_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], cells: torch.Tensor,
                  heat_sigma: float) -> torch.Tensor:
    """BCE on presence + CE on shape / cell / size and L1 (×10) on the box of the colours present + CE of each
    present colour's heat map against a Gaussian of width ``heat_sigma`` (fraction of the side) at its centre."""
    present = targets["presence"] > 0
    loss = F.binary_cross_entropy_with_logits(out["presence"], targets["presence"])
    for h in HEADS:
        loss = loss + F.cross_entropy(out[h].flatten(0, 1), targets[h].flatten())
    if bool(present.any()):
        loss = loss + 10 * F.l1_loss(out["box"][present], targets["box"][present])
        d2 = ((cells[None] - targets["box"][present][:, :2, None]) ** 2).sum(1)  # (M, h·w)
        wanted = torch.softmax(-d2 / (2 * heat_sigma ** 2), dim=-1)
        loss = loss - (wanted * out["heat"][present].log_softmax(-1)).sum(-1).mean()
    return loss


def train_detector(out_dir: str | Path | None = None, steps: int = DEFAULT_STEPS, batch_size: int = 128,
                   lr: float = 3e-3, seed: int = 0, config: PairDetectorConfig | None = None,
                   val_dir: str | Path | None = None, log: Callable[[str], None] | None = print,
                   num_threads: int | None = 1) -> PairDetector:
    """Train a detector on rendered scenes (``detector_scene``, degraded by ``augment``); export it to ``out_dir``.

    AdamW with a one-cycle (linear warm-up, cosine decay) learning rate on :func:`detector_loss`. With
    ``val_dir`` (a shapes dataset), its accuracy on the real val images (:func:`evaluate_detector`) goes into
    ``metrics.json`` with the training time. ``num_threads`` as in ``shapes_probe.train_probe``.
    """
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _train_detector(out_dir, steps, batch_size, lr, seed, config, val_dir, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train_detector(out_dir: str | Path | None, steps: int, batch_size: int, lr: float, seed: int,
                    config: PairDetectorConfig | None, val_dir: str | Path | None,
                    log: Callable[[str], None] | None) -> PairDetector:
    start, start_cpu = time.perf_counter(), time.process_time()
    config = config or PairDetectorConfig()
    rng, generator = random.Random(f"pair-detector-{seed}"), torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        detector = PairDetector(config)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    detector.train()
    r = config.resolution
    for step in range(steps):
        scenes = [detector_scene(rng) for _ in range(batch_size)]
        x, (dx, dy) = augment(to_unit(render_batch(scenes, r)), generator, return_shift=True)
        targets = scene_targets(scenes, config, shift=(-dx / r, -dy / r))
        loss = detector_loss(detector(x), targets, detector.cells, heat_sigma=0.6 * 4 / r)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"pair detector step {step}/{steps} loss {loss.item():.4f}")
    detector.eval()
    metrics: dict[str, Any] = {"train_seconds": round(time.perf_counter() - start, 1),
                               "train_cpu_seconds": round(time.process_time() - start_cpu, 1), "steps": steps,
                               "batch_size": batch_size, "seed": seed}
    if val_dir is not None:
        metrics["val"] = evaluate_detector(detector, *load_scenes(val_dir, "val"))
        metrics["data_dir"] = str(val_dir)
        if log:
            log("pair detector on real val images: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics["val"].items() if not k.startswith("n")))
    detector.metrics = metrics
    if out_dir is not None:
        save_part(detector, out_dir)
        write_json(Path(out_dir) / "metrics.json", metrics)
    return detector


# ---- real images ------------------------------------------------------------------------------------------------
def load_scenes(data_dir: str | Path, split: str, limit: int | None = None, resolution: int = 32
                ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Every image of a shapes split as uint8 (N, 3, R, R) with its scene (objects, background) from the json."""
    from PIL import Image

    images, scenes = [], []
    for url in list_shards(data_dir, split):
        for _, files in read_shard(url):
            meta = json.loads(files["json"])
            im = decode_rgb(files["png"])
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BOX)
            images.append(np.asarray(im))
            scenes.append({"objects": meta["objects"], "background": meta["background"]})
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no shapes samples in {data_dir} ({split}); build them with `ldm data shapes`")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), scenes


@torch.no_grad()
def evaluate_detector(detector: PairDetector, images: torch.Tensor, scenes: Sequence[dict[str, Any]]
                      ) -> dict[str, float]:
    """Accuracy on images with known scenes (uint8 or [-1, 1]), over the two-object scenes (``pair_*``) and the
    single-object ones (``single_*``): ``colours`` the set of colours found is exactly the scene's; ``shape`` /
    ``position`` / ``size`` every object's read right; ``relation`` (pairs) the first object's box stands in the
    scene's relation to the second's; ``all`` everything at once; ``centre_px`` the mean centre error in pixels."""
    x = to_unit(images) if images.dtype == torch.uint8 else images
    found = detector.detect(x)
    out: dict[str, float] = {}
    for name, count in (("pair", 2), ("single", 1)):
        idx = [i for i, s in enumerate(scenes) if len(s["objects"]) == count]
        if not idx:
            continue
        right = {k: 0 for k in ("colours", *HEADS, "relation", "all")}
        errors = []
        for i in idx:
            objects, got = scenes[i]["objects"], found[i]
            colours = set(got) == {o["color"] for o in objects}
            ok = {h: all(o["color"] in got and got[o["color"]][h] == o[h] for o in objects) for h in HEADS}
            relation = True
            if count == 2:
                o1, o2 = objects
                relation = (o1["color"] in got and o2["color"] in got and shapes_data.relation_of(o1, o2) in
                            relations_between(got[o1["color"]]["box"], got[o2["color"]]["box"]))
                right["relation"] += relation
            right["colours"] += colours
            for h in HEADS:
                right[h] += ok[h]
            right["all"] += colours and all(ok.values()) and relation
            for o in objects:
                if o["color"] in got:
                    b, t = got[o["color"]]["box"], shapes_data.object_box(o)
                    errors.append(math.dist(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2),
                                            ((t[0] + t[2]) / 2, (t[1] + t[3]) / 2)))
        out[f"n_{name}"] = len(idx)
        out.update({f"{name}_{k}": v / len(idx) for k, v in right.items() if count == 2 or k != "relation"})
        out[f"{name}_centre_px"] = float(np.mean(errors)) * images.shape[-1] if errors else float("nan")
    return out


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> PairDetector:
    """Load an exported detector (config.json + model.safetensors) in eval mode, with its metrics.json."""
    detector = load_part(path, PairDetector, map_location=map_location)
    metrics = Path(path) / "metrics.json"
    detector.metrics = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return detector.eval()


def load_or_train_detector(detector_dir: str | Path, val_dir: str | Path | None = None, **train_kwargs: Any
                           ) -> PairDetector:
    """The detector in ``detector_dir`` if it exists, else one trained (and validated on ``val_dir``) there."""
    if (Path(detector_dir) / "model.safetensors").is_file():
        return load_detector(detector_dir)
    return train_detector(detector_dir, val_dir=val_dir, **train_kwargs)
