"""``ldm bench gpu`` / ``make gpu-check``: the GPU-readiness run. Its CPU smoke test (tiny models) is slow; the real
check and the FSDP overlay on GPUs are marked ``cuda`` and skip without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.bench.gpu import format_table, gpu_check
from ldm.cli import main

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_sd_check_refuses_to_run_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "gpu", "--size", "tiny", "--parts", "ldm", "--out", str(tmp_path / "r.json")]) == 2


def _check_result(result, parts=("vae", "clip", "ldm")):
    assert set(result["parts"]) == set(parts)
    for name in parts:
        r = result["parts"][name]
        assert r["steps"] > r["timed_steps"] > 0 and r["img_per_s"] > 0 and r["params"] > 0
        assert r["loss_first"] is not None and r["loss_last"] is not None
    assert result["sample"]["images"] == 8 and result["sample"]["img_per_s"] > 0
    assert "img/s" in format_table(result)


@pytest.mark.slow
def test_the_whole_sequence_runs_with_tiny_models_on_the_cpu(tmp_path):
    result = gpu_check(tmp_path, steps=4, warmup=1, size="tiny", accelerator="cpu", devices=1, precision="32-true",
                       sample_steps=2)
    _check_result(result)
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "parts" / "ldm" / "unet").is_dir()


@pytest.mark.cuda
@needs_cuda
def test_sd_sized_parts_train_in_bf16_on_every_gpu(tmp_path):
    result = gpu_check(tmp_path, steps=30, warmup=10, size="sd", accelerator="gpu", devices=1)
    _check_result(result)
    for r in result["parts"].values():
        assert r["peak_memory_gib"] > 0.5
    (tmp_path / "gpu_check.json").write_text(json.dumps(result, indent=2))


@pytest.mark.cuda
@needs_cuda
def test_sharded_strategy_shards_the_unet_and_its_ema_on_a_gpu(tmp_path):
    import pytorch_lightning as pl
    from tiny_parts import TINY_UNET, export_tiny_parts

    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.training.sharded import ShardedStrategy

    vae, text = export_tiny_parts(tmp_path)
    model = LatentDiffusion(vae_path=str(vae), text_encoder_path=str(text), denoiser=dict(TINY_UNET), resolution=16,
                            sample_every_n_val=0)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": ["a red circle"] * 4}
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=ShardedStrategy(), max_steps=3, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(model, [batch] * 3)
    assert type(model.ema.shadow[0]).__name__ == "DTensor" and trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model.export(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "unet" / "model.safetensors").is_file()
