"""Generation requests and PNG metadata: every PNG `ldm generate` writes carries its parameters and `--from-png` makes
it again bit for bit (text-to-image with a stochastic sampler across batches, inpainting, the grid); the per-step
callback; the labelled grid."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_parts import tiny_pipeline

from ldm.cli import main as ldm_main
from ldm.errors import UsageError
from ldm.generation import GenerationRequest, read_png_metadata
from ldm.visual import LABEL_FONT_SIZE, image_grid


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    tiny_pipeline().save_pretrained(path)
    return path


def generate(pipe_dir, out, *flags):
    assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--steps", "3", "--device", "cpu", "--out", str(out),
                     *flags]) == 0


def fails(capsys, argv, message):
    """`ldm` refuses ``argv`` with one line on stderr that says ``message`` (exit status 2)."""
    capsys.readouterr()
    assert ldm_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_every_png_carries_its_request_and_is_made_again_bit_for_bit(pipe_dir, tmp_path):
    # ddpm draws fresh noise at every step and batch size 3 splits the 4 images into two batches
    generate(pipe_dir, tmp_path / "grid.png", "--prompt", "a red circle", "--prompt", "a blue star", "--n", "2",
             "--batch-size", "3", "--sampler", "ddpm", "--seed", "7", "--negative-prompt", "green")
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert [p.name for p in singles] == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    meta = read_png_metadata(singles[3])
    assert meta["index"] == 3 and meta["prompt"] == "a blue star" and len(meta["pipeline_sha256"]) == 64
    request = GenerationRequest.from_dict(meta["request"])
    assert (request.steps, request.sampler, request.seed, request.guidance, request.negative_prompt) == \
        (3, "ddpm", 7, 4.0, "green")
    assert "Seed: 7" in Image.open(singles[3]).text["parameters"]
    for source in (singles[3], singles[0], tmp_path / "grid.png"):
        again = tmp_path / f"again-{source.name}"
        assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--from-png", str(source), "--out", str(again),
                         "--device", "cpu"]) == 0
        assert again.read_bytes() == source.read_bytes()


def test_inpainting_pngs_are_made_again_and_check_their_inputs(pipe_dir, tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (200, 40, 40)).save(init)
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (0, 0, 8, 8))
    m.save(mask)
    generate(pipe_dir, tmp_path / "inp.png", "--prompt", "a star", "--n", "2", "--init-image", str(init),
             "--mask", str(mask), "--resample", "1")
    image = tmp_path / "inp" / "000_01.png"
    request = GenerationRequest.from_dict(read_png_metadata(image)["request"])
    assert request.mode == "inpaint" and request.strength is None and len(request.mask_sha256) == 64
    moved = tmp_path / "moved.png"
    moved.write_bytes(init.read_bytes())
    init.unlink()
    again = tmp_path / "again.png"
    assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--from-png", str(image), "--init-image", str(moved),
                     "--out", str(again), "--device", "cpu"]) == 0
    assert list(Image.open(again).getdata()) == list(Image.open(image).getdata())   # the same pixels
    assert read_png_metadata(again)["request"]["init_image"] == str(moved)            # the input where it is now
    Image.new("RGB", (16, 16), (0, 0, 0)).save(moved)
    fails(capsys, ["generate", "--pipeline", str(pipe_dir), "--from-png", str(image), "--init-image", str(moved),
                   "--out", str(again), "--device", "cpu"], "is not the file this image was made from")


def test_from_png_refuses_other_pipelines_and_foreign_pngs(pipe_dir, tmp_path, capsys):
    generate(pipe_dir, tmp_path / "g.png", "--prompt", "a", "--n", "1")
    other = tmp_path / "other"
    tiny_pipeline(seed=1).save_pretrained(other)
    fails(capsys, ["generate", "--pipeline", str(other), "--from-png", str(tmp_path / "g" / "000_00.png"),
                   "--out", str(tmp_path / "x.png"), "--device", "cpu"], "was made with another pipeline")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    fails(capsys, ["generate", "--pipeline", str(pipe_dir), "--from-png", str(plain), "--out", str(tmp_path / "y.png")],
          "carries no ldm generation parameters")


def test_only_index_and_the_step_callback():
    pipe = tiny_pipeline()
    prompts = ["a red circle", "a blue star"]
    seen = []
    full = pipe.generate(prompts, n_per_prompt=2, batch_size=3, steps=3, sampler="euler-a", seed=4, progress=False,
                         callback=lambda info: seen.append((info["phase"], info["batch"], info["step"], info["total"])))
    assert seen == [("sample", 0, 1, 6), ("sample", 0, 2, 6), ("sample", 0, 3, 6),
                    ("sample", 3, 4, 6), ("sample", 3, 5, 6), ("sample", 3, 6, 6)]
    for index in (1, 3):
        one = pipe.generate(prompts, n_per_prompt=2, batch_size=3, steps=3, sampler="euler-a", seed=4,
                            progress=False, only_index=index)
        assert torch.equal(one, full[index:index + 1])


def test_grid_rows_are_labelled_and_upscaled():
    images = [Image.new("RGB", (32, 32), (255, 0, 0))] * 4
    grid = image_grid(images, rows=2, scale=4, pad=2, row_labels=["a prompt", "a much longer prompt " * 10])
    band = LABEL_FONT_SIZE + 6
    assert grid.size == (2 * (128 + 2) + 2, 2 * (128 + 2 + band) + 2)
    label_strip = grid.crop((2, 2, grid.width - 2, 2 + band)).convert("L")
    assert min(label_strip.getdata()) < 100          # dark text in the white band
    assert grid.getpixel((10, 2 + band + 10)) == (255, 0, 0)
    unlabelled = image_grid(images, rows=2, scale=1)
    assert unlabelled.size == (2 * 34 + 2, 2 * 34 + 2)
    with pytest.raises(ValueError, match="row labels"):
        image_grid(images, rows=2, row_labels=["one"])


def test_request_round_trips_through_json():
    request = GenerationRequest(["a", "b"], n=3, classifier_labels={"color": "red"}, strength=0.4)
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.__dict__))) == request
    with pytest.raises(UsageError, match="not an ldm generation request"):
        GenerationRequest.from_dict({"prompts": ["a"], "colour": 1})
