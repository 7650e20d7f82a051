"""The procedural shapes dataset: vocabularies, scenes, rendering, captions, eval prompts, shard build."""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main as ldm_main
from ldm.data import shapes
from ldm.data.shards import read_shard


def _scene(shape="circle", color="red", size="large", position="centre", background="gray"):
    r = shapes.SIZES[size]
    cx, cy = shapes.cell_center(position, r)
    return {"objects": [{"shape": shape, "color": color, "size": size, "position": position,
                         "center": [cx, cy], "radius": r}], "background": background}


def _object_mask(image: Image.Image, background: str) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    return np.linalg.norm(a - np.array(shapes.BACKGROUNDS[background]), axis=-1) > 40


def test_vocabularies_are_large_and_far_apart():
    assert len(shapes.SHAPES) >= 5 and len(shapes.COLORS) == 10 and len(shapes.POSITIONS) == 9
    assert set(shapes.SIZES) == {"small", "large"}
    for a, b in itertools.combinations(shapes.COLORS.values(), 2):
        assert math.dist(a, b) >= 100
    assert not set(shapes.COLORS) & set(shapes.BACKGROUNDS)
    for color in shapes.COLORS:  # every colour has several backgrounds it stands out on
        assert len(shapes.allowed_backgrounds([color])) >= 4


def test_scenes_are_deterministic_valid_and_mixed():
    a = [shapes.sample_scene(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng, two_object_fraction=0.25) for _ in range(2000)]
    two = [s for s in scenes if len(s["objects"]) == 2]
    assert 0.21 < len(two) / len(scenes) < 0.29
    for s in scenes:
        colors = [o["color"] for o in s["objects"]]
        assert s["background"] in shapes.allowed_backgrounds(colors)
        for o in s["objects"]:
            assert o["shape"] in shapes.SHAPES and o["color"] in shapes.COLORS and o["position"] in shapes.POSITIONS
    for s in two:
        o1, o2 = s["objects"]
        assert o1["color"] != o2["color"]
        assert math.dist(o1["center"], o2["center"]) > shapes.BOUND * (o1["radius"] + o2["radius"])
    assert {o["position"] for s in scenes for o in s["objects"]} == set(shapes.POSITIONS)
    assert {o["shape"] for s in scenes for o in s["objects"]} == set(shapes.SHAPES)


@pytest.mark.parametrize("size", [32, 64])
def test_render_places_each_shape_in_its_grid_cell(size):
    for shape, position, sz in itertools.product(shapes.SHAPES, shapes.POSITIONS, shapes.SIZES):
        image = shapes.render(_scene(shape, "red", sz, position, "teal"), size)
        assert image.size == (size, size) and image.mode == "RGB"
        mask = _object_mask(image, "teal")
        ys, xs = np.nonzero(mask)
        box_center = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / 2 / size
        centers = {p: np.array(shapes.cell_center(p, shapes.SIZES[sz])) for p in shapes.POSITIONS}
        nearest = min(centers, key=lambda p: np.linalg.norm(centers[p] - box_center))
        # the drawn shape sits on its cell centre (within a pixel at 32 px), and never touches the border
        assert nearest == position and np.abs(centers[position] - box_center).max() < 1 / 32, (shape, position, sz)
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), (shape, position)


def test_neighbouring_cells_are_far_apart_compared_to_jitter():
    for sz, r in shapes.SIZES.items():
        centers = [np.array(shapes.cell_center(p, r)) for p in shapes.POSITIONS]
        closest = min(np.abs(a - b).max() for a, b in itertools.combinations(centers, 2))
        assert closest * 32 > 5.5 and closest > 4 * shapes.JITTER, sz


def test_render_colours_and_areas_are_exact():
    image = shapes.render(_scene("circle", "purple", "large", "centre", "beige"), 32)
    a = np.asarray(image)
    assert tuple(a[16, 16]) == shapes.COLORS["purple"] and tuple(a[0, 0]) == shapes.BACKGROUNDS["beige"]
    # the anti-aliased coverage of a circle of radius r = 0.25·32 px is π r² up to 2 %
    cover = np.abs(a.astype(float) - shapes.BACKGROUNDS["beige"]).sum(-1) / np.abs(
        np.subtract(shapes.COLORS["purple"], shapes.BACKGROUNDS["beige"])).sum()
    assert cover.sum() == pytest.approx(math.pi * 8.0 ** 2, rel=0.02)
    areas = {s: _object_mask(shapes.render(_scene(s, "white", "large"), 128), "gray").sum() for s in shapes.SHAPES}
    assert areas["star"] < areas["triangle"] < areas["circle"] and areas["diamond"] < areas["square"]
    small = _object_mask(shapes.render(_scene("circle", "white", "small"), 32), "gray").sum()
    large = _object_mask(shapes.render(_scene("circle", "white", "large"), 32), "gray").sum()
    assert 2.0 < large / small < 3.0  # (0.25 / 0.16)² = 2.44


def test_captions_name_every_object_and_relations_are_true():
    rng = random.Random(3)
    templates = Counter()
    for _ in range(1500):
        scene = shapes.sample_scene(rng, two_object_fraction=0.5)
        text, template = shapes.caption_and_template(scene, rng)
        templates[template] += 1
        for o in scene["objects"]:
            assert o["color"] in text and o["shape"] in text, text
        assert " a o" not in text and " a a" not in text and not text.startswith("a o")  # "an orange"
        if template == "relation":
            o1, o2 = scene["objects"]
            if "left of" in text:
                assert o1["center"][0] < o2["center"][0]
            if "right of" in text:
                assert o1["center"][0] > o2["center"][0]
            if " above " in text:
                assert o1["center"][1] < o2["center"][1]
            if " below " in text:
                assert o1["center"][1] > o2["center"][1]
        if template in ("sized", "plain", "full", "there_is"):
            assert shapes.PHRASES[scene["objects"][0]["position"]] in text
    assert set(templates) == set(shapes.SINGLE_TEMPLATES) | set(shapes.PAIR_TEMPLATES)
    positioned = sum(v for k, v in templates.items() if k not in ("background_only", "no_position", "pair_background"))
    assert positioned / sum(templates.values()) > 0.75


def test_eval_prompts_are_balanced_and_seeded():
    prompts = shapes.eval_prompts(90, seed=0)
    assert prompts == shapes.eval_prompts(90, seed=0) and prompts != shapes.eval_prompts(90, seed=1)
    for key, values in (("color", shapes.COLORS), ("shape", shapes.SHAPES), ("position", shapes.POSITIONS)):
        counts = Counter(attrs[key] for _, attrs in prompts)
        assert set(counts) == set(values) and max(counts.values()) - min(counts.values()) <= 1
    text, attrs = prompts[0]
    assert text == f"a {attrs['size']} {attrs['color']} {attrs['shape']} {shapes.PHRASES[attrs['position']]}"
    assert len({p for p, _ in shapes.eval_prompts(450, seed=0)}) > 300  # combinations vary


def test_cli_build_is_deterministic_across_process_counts(tmp_path):
    args = ["data", "shapes", "--train", "48", "--val", "16", "--shard-size", "16", "--seed", "5"]
    assert ldm_main(args + ["--out", str(tmp_path / "a"), "--processes", "1"]) == 0
    assert ldm_main(args + ["--out", str(tmp_path / "b"), "--processes", "2"]) == 0
    for split, n in (("train", 3), ("val", 8)):
        files = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert len(files) == n
        for f in files:
            assert (tmp_path / "a" / split / f).read_bytes() == (tmp_path / "b" / split / f).read_bytes()
    info = json.loads((tmp_path / "a" / "info.json").read_text())
    assert info["counts"] == {"train": 48, "val": 16} and info["resolution"] == 32
    assert info["generator"] == {"version": shapes.VERSION, "seed": 5,
                                 "two_object_fraction": shapes.TWO_OBJECT_FRACTION}
    assert "license" in info and "source" in info
    with tarfile.open(tmp_path / "a" / "train" / "train-00000.tar") as tar:
        assert tar.getnames()[:3] == ["train_00000000.json", "train_00000000.png", "train_00000000.txt"]
    # every sample: the json holds every attribute and the png is exactly the rendered scene
    for key, files in read_shard(str(tmp_path / "a" / "val" / "val-00001.tar")):
        meta = json.loads(files["json"])
        assert meta["resolution"] == 32 and meta["template"] and meta["background"] in shapes.BACKGROUNDS
        for o in meta["objects"]:
            assert set(o) == {"shape", "color", "size", "position", "center", "radius"}
            assert o["color"] in files["txt"].decode()
        image = np.asarray(Image.open(io.BytesIO(files["png"])))
        scene = {"objects": meta["objects"], "background": meta["background"]}
        np.testing.assert_array_equal(image, np.asarray(shapes.render(scene, 32)))


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--size"):
        shapes.build_shapes(tmp_path, train=1, val=1, size=4)
    with pytest.raises(ValueError, match="--two-object-fraction"):
        shapes.build_shapes(tmp_path, train=1, val=1, two_object_fraction=1.5)


def test_cli_help_states_the_two_object_default(capsys):
    with pytest.raises(SystemExit):
        ldm_main(["data", "shapes", "--help"])
    assert f"default: {shapes.TWO_OBJECT_FRACTION}," in " ".join(capsys.readouterr().out.split())
