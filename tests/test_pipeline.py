"""TextToImagePipeline: export round trip, determinism, input checks, and `ldm generate` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_parts import tiny_pipeline

from ldm.cli import main as ldm_main
from ldm.io import PartError
from ldm.pipeline import TextToImagePipeline
from ldm.visual import LABEL_FONT_SIZE


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    tiny_pipeline().save_pretrained(path)
    return path


def test_export_round_trip_gives_the_same_images(pipe_dir):
    a = tiny_pipeline().generate(["a red circle", "a blue square"], steps=3, seed=7, progress=False)
    b = TextToImagePipeline.from_pretrained(pipe_dir).generate(["a red circle", "a blue square"], steps=3, seed=7,
                                                                progress=False)
    assert a.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_same_seed_same_images_and_batch_size_does_not_matter(pipe_dir):
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    prompts = ["a red circle", "a green star", ""]
    a = pipe.generate(prompts, steps=2, seed=3, batch_size=3, progress=False)
    b = pipe.generate(prompts, steps=2, seed=3, batch_size=1, progress=False)
    c = pipe.generate(prompts, steps=2, seed=4, batch_size=3, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 1e-3


def test_guidance_one_equals_the_conditional_model(pipe_dir):
    """w = 1 must give the purely conditional prediction, whatever the uncond prompt is."""
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    a = pipe.generate(["a red circle"], steps=2, guidance=1.0, seed=0, progress=False)
    b = pipe.generate(["a red circle"], steps=2, guidance=1.0, seed=0, negative_prompt="a blue square", progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = pipe.generate(["a red circle"], steps=2, guidance=3.0, seed=0, negative_prompt="a blue square", progress=False)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be"),
    ({"guidance": -1.0}, "guidance must be >= 0"),
    ({"height": 18}, "multiples of the VAE factor 4"),
    ({"sampler": "plms"}, "unknown sampler"),
])
def test_bad_requests_are_clear_errors(pipe_dir, kwargs, message):
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    with pytest.raises(ValueError, match=message):
        pipe.generate(["a red circle"], progress=False, **kwargs)


def test_empty_and_very_long_prompts_work(pipe_dir):
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    with pytest.warns(UserWarning, match="truncat"):
        images = pipe(["", "red " * 2500], steps=1, progress=False)
    assert len(images) == 2 and images[0].size == (16, 16)


def test_missing_or_mismatched_part_is_named(pipe_dir, tmp_path):
    import shutil

    broken = tmp_path / "p"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(PartError, match=r"lacks \['unet'\]"):
        TextToImagePipeline.from_pretrained(broken)
    shutil.copytree(pipe_dir / "unet", broken / "unet")
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["context_dim"] = 64
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PartError, match="unet"):
        TextToImagePipeline.from_pretrained(broken)


def test_generate_cli_writes_grid_and_images(pipe_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = ldm_main(["generate", "--pipeline", str(pipe_dir), "--prompt", "a red circle", "--prompt", "a blue star",
                   "--n", "2", "--steps", "2", "--scale", "1", "--out", str(out)])
    assert rc == 0 and "wrote grid" in capsys.readouterr().out
    grid = Image.open(out)
    band = LABEL_FONT_SIZE + 6  # each row is labelled with its prompt
    assert grid.size == (2 * 18 + 2, 2 * (18 + band) + 2)
    assert len(list((tmp_path / "grid").glob("*.png"))) == 4


def test_pooled_conditioned_unet_round_trips_and_guidance_one_is_conditional(tmp_path):
    pipe = tiny_pipeline(pooled_dim=32)
    pipe.save_pretrained(tmp_path / "p")
    prompts = ["a red circle", "a blue square"]
    a = pipe.generate(prompts, steps=3, seed=1, progress=False)
    b = TextToImagePipeline.from_pretrained(tmp_path / "p").generate(prompts, steps=3, seed=1, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    swapped = pipe.generate(prompts[::-1], steps=3, seed=1, progress=False)
    assert not torch.allclose(a[0], swapped[1])  # same noise, other prompt: the pooled embedding matters
