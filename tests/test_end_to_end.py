"""A seconds-long `make demo`: shapes shards → latent cache → `ldm fit` the U-Net → export → `ldm generate`."""

from __future__ import annotations

import json

import torch
from tiny_parts import TINY_UNET, export_tiny_parts

from ldm.cli import main as ldm_main
from ldm.data.latents import LatentDataModule, LatentDataset, load_empty_conditioning
from ldm.io import load_part
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.text_encoder import CLIPTextConditioner
from ldm.pipeline import TextToImagePipeline


def test_cache_matches_the_encoders(tmp_path, shapes_dir):
    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    cache = tmp_path / "cache"
    assert ldm_main(["cache", "--vae", str(vae_dir), "--text-encoder", str(te_dir), "--data", str(shapes_dir),
                     "--out", str(cache), "--batch-size", "50"]) == 0
    info = json.loads((cache / "info.json").read_text())
    assert info["splits"]["train"]["samples"] == 240 and info["splits"]["val"]["samples"] == 64
    ds = LatentDataset(cache, "val")
    batch = ds.__getitems__([0, 5])
    vae, te = load_part(vae_dir, AutoencoderKL), load_part(te_dir, CLIPTextConditioner)
    # the first val samples, decoded the same way as training reads them
    from ldm.data.shards import list_shards
    from ldm.data.webdata import ShardDataset

    first = next(iter(ShardDataset(list_shards(shapes_dir, "val"), 32, 6, rank=0, world_size=1)))
    assert [first["caption"][0], first["caption"][5]] == batch["caption"]
    with torch.no_grad():
        post = vae.encode(first["image"][[0, 5]])
        tokens, pooled, mask = te.encode_text(batch["caption"], return_mask=True)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    # (batches of 50 and of 2 may take different oneDNN kernels: float rounding of ~1e-5, hence 1e-4)
    torch.testing.assert_close(batch["latent_mean"], (post.mean - shift) * scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["latent_std"], post.std * scale, atol=1e-4, rtol=1e-4)
    cond = batch["cond"]
    keep = cond.length
    assert torch.equal(cond.mask, mask[:, :keep]) and mask[:, keep:].sum() == 0
    torch.testing.assert_close(cond.tokens, tokens[:, :keep], atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(cond.pooled, pooled, atol=2e-3, rtol=2e-3)
    empty = load_empty_conditioning(cache)
    assert empty.tokens.shape == (1, keep, 32) and empty.mask.sum() == 2  # "" = start + end token
    torch.testing.assert_close(empty.pooled, te.encode_text([""])[1], atol=2e-3, rtol=2e-3)
    dm = LatentDataModule(str(cache), batch_size=32)
    assert next(iter(dm.train_dataloader()))["latent_mean"].shape == (32, 4, 8, 8)
    # --max-samples keeps each split's first N samples (cutting inside a batch), the same values
    capped = tmp_path / "capped"
    assert ldm_main(["cache", "--vae", str(vae_dir), "--text-encoder", str(te_dir), "--data", str(shapes_dir),
                     "--out", str(capped), "--batch-size", "50", "--max-samples", "70"]) == 0
    info = json.loads((capped / "info.json").read_text())
    assert info["splits"]["train"]["samples"] == 70 and info["splits"]["val"]["samples"] == 64
    full, cut = LatentDataset(cache, "train"), LatentDataset(capped, "train")
    assert len(cut) == 70 and cut.__getitems__([69])["caption"] == full.__getitems__([69])["caption"]
    assert torch.equal(cut.__getitems__([0, 69])["latent_mean"], full.__getitems__([0, 69])["latent_mean"])


def test_tiny_demo_trains_exports_and_generates(tmp_path, shapes_dir):
    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    cache, run, pipe_dir = tmp_path / "cache", tmp_path / "ldm", tmp_path / "pipeline"
    assert ldm_main(["cache", "--vae", str(vae_dir), "--text-encoder", str(te_dir), "--data", str(shapes_dir),
                     "--out", str(cache)]) == 0
    unet = json.dumps(TINY_UNET)  # the denoiser block: type defaults to unet
    assert ldm_main(["fit", "--model", "ldm.models.latent_diffusion.LatentDiffusion",
                     "--model.vae_path", str(vae_dir), "--model.text_encoder_path", str(te_dir),
                     "--model.denoiser", unet, "--model.resolution", "32", "--model.sample_steps", "2",
                     "--model.val_prompts", '["a red circle", "a blue star"]',
                     "--data", "ldm.data.latents.LatentDataModule", "--data.cache_dir", str(cache),
                     "--data.batch_size", "32", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "6",
                     "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                     "--trainer.enable_progress_bar", "false", "--export-to", str(tmp_path / "exported")]) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert list((run / "version_0" / "images").glob("val_samples_*.png"))  # validation sample grids
    assert ldm_main(["export", "--ckpt", str(last), "--out", str(pipe_dir)]) == 0
    # `ldm fit --export-to` wrote the same pipeline from the same final last.ckpt, file for file
    written = sorted(p.relative_to(pipe_dir) for p in pipe_dir.rglob("*") if p.is_file())
    assert written and written == sorted(p.relative_to(tmp_path / "exported")
                                         for p in (tmp_path / "exported").rglob("*") if p.is_file())
    assert all((pipe_dir / f).read_bytes() == (tmp_path / "exported" / f).read_bytes() for f in written)
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    assert pipe.config.height == 32
    out = tmp_path / "grid.png"
    assert ldm_main(["generate", "--pipeline", str(pipe_dir), "--prompt", "a red circle", "--n", "2",
                     "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_adherence_command_writes_figures_for_a_sweep(tmp_path, shapes_dir):
    from tiny_parts import tiny_pipeline

    from ldm.data.shapes import pair_eval_prompts

    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "adherence.json"
    assert ldm_main(["adherence", "--pipeline", str(tmp_path / "pipe"), "--probe", str(tmp_path / "probe"),
                     "--data", str(shapes_dir), "--probe-steps", "10", "--n", "10", "--steps", "1,2", "--guidance", "4",
                     "--pair-n", "6", "--detector-steps", "5", "--out", str(out), "--grid", str(tmp_path / "grid.png"),
                     "--pair-grid", str(tmp_path / "pairs.png")]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["steps"], r["guidance"]) for r in results] == [(1, 4.0), (2, 4.0)]
    for r in results:
        assert r["n"] == 10 and all(0.0 <= r[k] <= 1.0 for k in ("color", "shape", "position", "all_three"))
        assert r["pair_n"] == 6 and all(0.0 <= r[f"pair_{k}"] <= 1.0 for k in ("present", "bound", "relation", "all"))
        assert r["pair_all"] <= min(r["pair_bound"], r["pair_relation"]) <= r["pair_present"]
    assert (tmp_path / "probe" / "model.safetensors").is_file()  # trained on demand, then reused
    assert (tmp_path / "probe" / "pair_detector" / "model.safetensors").is_file()  # the detector beside it
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "pairs.png").is_file()
    assert (tmp_path / "pairs.txt").read_text().splitlines() == [p for p, _ in pair_eval_prompts(6)]


def test_two_object_mode_scores_the_generated_images_of_the_pair_prompts():
    """measure_pair_adherence = the detector's reading of the images the pipeline draws for pair_eval_prompts."""
    from tiny_parts import tiny_pipeline

    from ldm.data.shapes import pair_eval_prompts
    from ldm.evaluation.adherence import format_table, measure_pair_adherence
    from ldm.evaluation.pair_detector import PairDetector, PairDetectorConfig, pair_adherence

    pipe = tiny_pipeline()
    torch.manual_seed(0)
    detector = PairDetector(PairDetectorConfig(width=8)).eval()
    with torch.no_grad():
        detector.presence.fill_(30.0)  # every colour "found": presence, binding and relation then vary by image
    row = measure_pair_adherence(pipe, detector, n=8, steps=2, seed=3, batch_size=4)
    prompts = pair_eval_prompts(8, 3)
    images = pipe.generate([p for p, _ in prompts], steps=2, guidance=4.0, sampler="dpmpp-2m", seed=3, batch_size=4,
                           progress=False)
    expected = pair_adherence(detector.detect(images), [t for _, t in prompts])
    assert row["pair_n"] == 8 and row["pair_present"] == 1.0 and row["pair_extra"] == 1.0
    assert {k: row[f"pair_{k}"] for k in ("bound", "relation", "all", "cells")} == {
        k: expected[k] for k in ("bound", "relation", "all", "cells")}
    table = format_table([{**row, "color": 1.0}])
    assert "two objects (8 prompts" in table and "both present" in table
