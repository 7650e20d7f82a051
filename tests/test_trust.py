"""Trust at the file boundary: crafted checkpoints cannot choose code, parts and caches carry provenance.

Covers issue 16's attacks (a weights-only checkpoint naming a writer function; a checkpoint whose data
folder is a shell command), argument checking before construction, cache replacement and its part check,
pipelines of parts not trained together, resume with other parts, tampered weights, and FSDP resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_parts import TINY_UNET, export_tiny_parts, tiny_pipeline, tiny_vae

from ldm.cli import main as ldm_main
from ldm.io import CheckpointLoadError, PartError, load_part, save_part
from ldm.models.checkpoint import rebuild_from_checkpoint, upgrade_hparams


def crafted(path: Path, model: str, hparams: dict, datamodule: dict | None = None) -> Path:
    """A checkpoint that passes ``weights_only=True``: plain values naming classes and arguments."""
    ckpt = {"state_dict": {}, "ldm_class_path": model, "hyper_parameters": hparams}
    if datamodule is not None:
        ckpt["ldm_datamodule"] = datamodule
    torch.save(ckpt, path)
    return path


def test_a_checkpoint_naming_a_writer_function_writes_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = crafted(tmp_path / "evil.ckpt", "ldm.io.atomic_write_bytes", {"path": str(target), "data": b"owned"})
    with pytest.raises(PartError, match="atomic_write_bytes.*not loaded"):
        rebuild_from_checkpoint(ckpt)
    assert ldm_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    evil_dm = {"class_path": "ldm.io.atomic_write_bytes", "init_args": {"path": str(target), "data": b"owned"}}
    ckpt = crafted(tmp_path / "evil-dm.ckpt", "ldm.models.autoencoder.AutoencoderModule", {}, evil_dm)
    with pytest.raises(PartError, match="not loaded"):
        rebuild_from_checkpoint(ckpt)
    assert not target.exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_whose_data_folder_is_a_command_runs_nothing(tmp_path):
    from ldm.models.autoencoder import AutoencoderModule

    marker = tmp_path / "ran"
    model = AutoencoderModule(vae={"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "norm_groups": 4,
                                   "resolution": 16, "attn_resolutions": [], "mid_attention": False}, disc_start=None)
    ckpt = {"state_dict": model.state_dict(), "ldm_class_path": "ldm.models.autoencoder.AutoencoderModule",
            "hyper_parameters": dict(model.hparams),
            "ldm_datamodule": {"class_path": "ldm.data.webdata.WebDataModule",
                               "init_args": {"data_dir": f"pipe:touch {marker}", "resolution": 16}}}
    torch.save(ckpt, tmp_path / "vae.ckpt")
    with pytest.raises(PartError, match="not a local path.*--data-dir"):
        rebuild_from_checkpoint(tmp_path / "vae.ckpt")
    assert ldm_main(["export", "--ckpt", str(tmp_path / "vae.ckpt"), "--out", str(tmp_path / "vae")]) == 2
    assert not marker.exists() and not (tmp_path / "vae").exists()


def test_arguments_are_checked_against_the_signature_before_construction(tmp_path):
    bad_type = crafted(tmp_path / "a.ckpt", "ldm.models.latent_diffusion.LatentDiffusion", {"vae_path": {"x": 1}})
    with pytest.raises(PartError, match="wrong type.*vae_path"):
        rebuild_from_checkpoint(bad_type)
    unknown = crafted(tmp_path / "b.ckpt", "ldm.models.latent_diffusion.LatentDiffusion", {"shell": "rm -rf /"})
    with pytest.raises(PartError, match="no argument.*shell"):
        rebuild_from_checkpoint(unknown)


def test_checkpoints_from_before_the_training_base_are_upgraded():
    old = {"unet": {"model_channels": 16}, "schedule": {"name": "linear"}, "lr": 2e-3, "betas": [0.9, 0.99],
           "warmup_steps": 100, "min_lr_ratio": 0.05, "p_uncond": 0.1}
    assert upgrade_hparams("LatentDiffusion", old) == {
        "denoiser": {"model_channels": 16}, "noise_schedule": {"name": "linear"}, "p_uncond": 0.1,
        "optimizer": {"lr": 2e-3, "betas": [0.9, 0.99]}, "lr_schedule": {"warmup_steps": 100, "min_lr_ratio": 0.05}}
    vae = upgrade_hparams("AutoencoderModule", {"lr": 1e-3, "lr_schedule": "cosine", "lr_decay_steps": None})
    assert vae == {"optimizer": {"lr": 1e-3}, "lr_schedule": {"decay": "cosine"}}


def test_a_cache_written_over_a_larger_one_holds_only_the_new_samples(tmp_path, shapes_dir):
    from ldm.data.latents import LatentDataset

    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    cache = tmp_path / "cache"
    args = ["cache", "--vae", str(vae_dir), "--text-encoder", str(te_dir), "--data", str(shapes_dir),
            "--out", str(cache)]
    assert ldm_main(args + ["--splits", "train"]) == 0
    assert len(LatentDataset(cache, "train")) == 240
    assert ldm_main(args + ["--splits", "train", "--max-samples", "30", "--batch-size", "10"]) == 0
    assert len(LatentDataset(cache, "train")) == 30
    info = json.loads((cache / "info.json").read_text())
    assert info["splits"]["train"]["chunks"] == ["chunk-00000.safetensors"]
    assert sorted(p.name for p in (cache / "train").iterdir()) == ["chunk-00000.safetensors"]
    assert not list(tmp_path.glob(".cache*"))  # no leftovers of the swap


def test_a_retrained_vae_is_refused_with_an_old_cache(tmp_path, shapes_dir):
    import pytorch_lightning as pl

    from ldm.data.latents import CacheError, LatentDataModule
    from ldm.models.latent_diffusion import LatentDiffusion

    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    cache = tmp_path / "cache"
    assert ldm_main(["cache", "--vae", str(vae_dir), "--text-encoder", str(te_dir), "--data", str(shapes_dir),
                     "--out", str(cache), "--splits", "train", "--max-samples", "20"]) == 0
    save_part(tiny_vae(seed=1), tmp_path / "retrained")  # same geometry, other weights
    model = LatentDiffusion(vae_path=str(tmp_path / "retrained"), text_encoder_path=str(te_dir),
                            denoiser=dict(TINY_UNET), resolution=32)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    with pytest.raises(CacheError, match="another vae.*rebuild it"):
        trainer.fit(model, LatentDataModule(str(cache), batch_size=4))


def test_swapped_parts_in_a_pipeline_are_refused_unless_allowed(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "vae")
    save_part(tiny_vae(seed=3), tmp_path / "pipe" / "vae")
    from ldm.pipeline import TextToImagePipeline

    with pytest.raises(PartError, match="trained with another vae.*--allow-mismatch"):
        TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    with pytest.warns(UserWarning, match="another vae"):
        TextToImagePipeline.from_pretrained(tmp_path / "pipe", allow_mismatch=True)
    generate = ["generate", "--pipeline", str(tmp_path / "pipe"), "--prompt", "a red circle", "--n", "1", "--steps",
                "1", "--out", str(tmp_path / "out.png")]
    assert ldm_main(generate) == 2 and not (tmp_path / "out.png").exists()
    with pytest.warns(UserWarning, match="another vae"):
        assert ldm_main(generate + ["--allow-mismatch"]) == 0


def test_tampered_weights_are_refused(tmp_path):
    save_part(tiny_vae(), tmp_path / "vae")
    weights = tmp_path / "vae" / "model.safetensors"
    other = tmp_path / "other"
    save_part(tiny_vae(seed=5), other)
    shutil.copy(other / "model.safetensors", weights)
    with pytest.raises(PartError, match="does not match the sha256"):
        load_part(tmp_path / "vae")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PartError, match="sha256|cannot read"):
        load_part(tmp_path / "vae")


def test_resume_with_other_parts_is_refused(tmp_path):
    from ldm.models.latent_diffusion import LatentDiffusion

    vae_dir, te_dir = export_tiny_parts(tmp_path / "parts")
    model = LatentDiffusion(vae_path=str(vae_dir), text_encoder_path=str(te_dir), denoiser=dict(TINY_UNET))
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["ldm_parts"]["vae"] and ckpt["ldm_parts"]["text_encoder"]
    save_part(tiny_vae(seed=2), tmp_path / "vae2")
    other = LatentDiffusion(vae_path=str(tmp_path / "vae2"), text_encoder_path=str(te_dir), denoiser=dict(TINY_UNET))
    with pytest.raises(PartError, match="another vae"):
        other.on_load_checkpoint(ckpt)
    model.on_load_checkpoint(ckpt)  # the same parts: fine


def test_fsdp_resume_is_weights_only(tmp_path):
    from ldm.training import SafeFSDPStrategy

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.ckpt")
    strategy = SafeFSDPStrategy()
    with pytest.raises(CheckpointLoadError, match="weights_only=True"):
        strategy.load_checkpoint(tmp_path / "evil.ckpt")
    (tmp_path / "sharded").mkdir()
    with pytest.raises(CheckpointLoadError, match="sharded FSDP checkpoint"):
        strategy.load_checkpoint(tmp_path / "sharded")
