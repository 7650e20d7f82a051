"""Fine-tuning from an imported pipeline (`--model.init_args.init_from PIPELINE`): it starts from that denoiser
with that pipeline's VAE and text encoder, trains on a cache built with them, exports with its provenance."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.bench.interop import tiny_diffusers_pipeline
from ldm.cli import main as ldm_main
from ldm.errors import LdmError
from ldm.interop.diffusers_pipeline import import_diffusers
from ldm.io import load_part
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.pipeline import TextToImagePipeline

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    tiny_diffusers_pipeline(root)
    return import_diffusers(root / "diffusers", root / "base")[0]


def test_init_from_starts_from_the_pipeline(imported):
    model = LatentDiffusion(init_from=str(imported), denoiser={"gradient_checkpointing": True})
    source = load_part(imported / "unet", kind="denoiser")
    assert all(torch.equal(a, b) for a, b in zip(model.denoiser.state_dict().values(), source.state_dict().values()))
    assert model.denoiser.config.gradient_checkpointing and model.hparams.resolution == 16
    assert model.schedule.config.prediction_type == "eps" and not model.text_encoder.config.mask_padding
    assert model.init_source["denoiser_sha256"] == json.loads((imported / "unet" / "config.json").read_text())[
        "_weights_sha256"]
    with pytest.raises(LdmError, match="model_channels"):
        LatentDiffusion(init_from=str(imported), denoiser={"model_channels": 8})
    with pytest.raises(LdmError, match="prediction_type"):
        LatentDiffusion(init_from=str(imported), noise_schedule={"prediction_type": "v"})
    with pytest.raises(LdmError, match="not a pipeline folder"):
        LatentDiffusion(init_from=str(imported / "unet"))
    with pytest.raises(LdmError, match="vae_path .* init_from brings its own"):
        LatentDiffusion(init_from=str(imported), vae_path=str(imported.parent))
    LatentDiffusion(init_from=str(imported), vae_path=str(imported / "vae"))  # the same part: fine


def test_finetune_from_imported_pipeline_trains_and_exports_with_provenance(imported, tmp_path, shapes_dir):
    cache, run, out = tmp_path / "cache", tmp_path / "ldm", tmp_path / "pipeline"
    assert ldm_main(["cache", "--vae", str(imported / "vae"), "--text-encoder", str(imported / "text_encoder"),
                     "--data", str(shapes_dir), "--resolution", "16", "--out", str(cache)]) == 0
    assert ldm_main(["fit", "--config", "ldm/finetune.yaml", "--model.init_args.init_from", str(imported),
                     "--data.init_args.cache_dir", str(cache), "--data.init_args.batch_size", "8",
                     "--model.init_args.val_prompts", '["a red circle"]', "--model.init_args.sample_steps", "2",
                     "--trainer.default_root_dir", str(run), "--trainer.max_steps", "3",
                     "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                     "--trainer.enable_progress_bar", "false"]) == 0
    assert ldm_main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    tuned = TextToImagePipeline.from_pretrained(out)
    source = TextToImagePipeline.from_pretrained(imported)
    origin = tuned.provenance["_init_from"]
    assert origin["path"] == str(imported.resolve())
    assert origin["denoiser_sha256"] == json.loads((imported / "unet" / "config.json").read_text())["_weights_sha256"]
    # it moved from where it started, a little (3 steps); the frozen parts are the pipeline's, unchanged
    a, b = (torch.cat([p.flatten() for p in pipe.denoiser.parameters()]) for pipe in (tuned, source))
    assert 0 < (a - b).norm() < 0.05 * b.norm()
    assert (out / "vae" / "model.safetensors").read_bytes() == (imported / "vae" / "model.safetensors").read_bytes()
    # and it exports to diffusers, carrying where it started
    assert ldm_main(["convert", "--to", "diffusers", str(out), "--out", str(tmp_path / "diffusers")]) == 0
    index = json.loads((tmp_path / "diffusers" / "model_index.json").read_text())
    assert index["_ldm"]["provenance"]["_init_from"]["denoiser_sha256"] == origin["denoiser_sha256"]
