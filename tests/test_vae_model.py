"""The VAE LightningModule: losses and both optimizers under manual optimization, precision, export, resume."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.io import load_checkpoint, load_part
from ldm.models.autoencoder import AutoencoderModule, latent_scale_and_shift
from ldm.modules.autoencoder import AutoencoderKL
from ldm.visual import tensor_rows_grid

GEOMETRY = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4, resolution=16)
DISC = dict(ndf=8, n_layers=2, norm="batch")


def squares(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Coloured squares on coloured backgrounds, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, size, size).clone()
    for i in range(n):
        r0, c0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, r0:r0 + size // 2, c0:c0 + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


class Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": "", "key": str(i)}


class Squares(pl.LightningDataModule):
    def __init__(self, n: int = 16, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.images = squares(n, seed)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Images(self.images), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Images(self.images[:8]), batch_size=8)


def module(**kw) -> AutoencoderModule:
    torch.manual_seed(0)
    args = dict(vae=GEOMETRY, discriminator=DISC, optimizer={"lr": 2e-3, "betas": [0.5, 0.9]}, disc_start=0,
                image_every_n_steps=0, export_batches=2)
    return AutoencoderModule(**{**args, **kw})


def trainer(tmp_path, steps: int, **kw) -> pl.Trainer:
    args = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    return pl.Trainer(**{**args, **kw})


def fit(model, tmp_path, steps, data=None, **kw) -> pl.Trainer:
    t = trainer(tmp_path, steps, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=data or Squares())
    return t


def test_latent_scale_recovers_known_distribution():
    assert latent_scale_and_shift([torch.tensor([1.0, 3.0]), torch.tensor([[1.0], [3.0]])]) == (1.0, 2.0)
    g = torch.Generator().manual_seed(0)
    batches = [3.0 + 0.5 * torch.randn(16, 4, 8, 8, generator=g) for _ in range(20)]  # 81,920 values
    scale, shift = latent_scale_and_shift(batches)
    assert scale == pytest.approx(2.0, rel=0.01) and shift == pytest.approx(3.0, abs=0.01)
    everything = torch.cat(batches).double()
    assert shift == pytest.approx(everything.mean().item(), abs=1e-9)
    assert scale == pytest.approx(1 / everything.std(unbiased=False).item(), rel=1e-9)
    with pytest.raises(ValueError, match="no batches"):
        latent_scale_and_shift([])


def test_training_steps_reduce_loss_and_move_logvar_and_discriminator(tmp_path):
    model = module()
    data = Squares(n=8)  # one fixed batch, seen 15 times
    x = data.images

    def rec_loss() -> float:
        with torch.no_grad():
            return (model.vae(x, sample_posterior=False)[0] - x).abs().mean().item()

    before, d_before = rec_loss(), [p.clone() for p in model.discriminator.parameters()]
    t = fit(model, tmp_path, steps=30, data=data)  # disc_start=0: 15 batches x (generator + discriminator step)
    opt_g, _ = model.optimizers()
    assert model.lr_schedulers()[0].last_epoch == 15 and t.global_step == 30
    assert rec_loss() < 0.85 * before  # 0.52 -> 0.40 with this seed
    assert model.logvar.item() != 0.0 and any(p is model.logvar for p in opt_g.param_groups[0]["params"])
    assert any(not torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters()))
    logged = t.callback_metrics
    for key in ("train/rec_loss", "train/kl_loss", "train/nll_loss", "train/logvar", "train/g_loss",
                "train/d_loss", "train/d_weight"):
        assert torch.isfinite(logged[key]), key
    assert logged["train/disc_active"] == 1.0 and logged["train/d_weight"] > 0


def test_discriminator_waits_for_disc_start(tmp_path):
    model = module(disc_start=3)
    d_before = [p.clone() for p in model.discriminator.parameters()]
    t = fit(model, tmp_path, steps=3)  # 3 batches, no discriminator step yet
    assert t.global_step == 3 and model.lr_schedulers()[0].last_epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters()))
    assert t.callback_metrics["train/disc_active"] == 0.0 and "train/g_loss" not in t.callback_metrics


def test_gradient_clipping_under_manual_optimization(tmp_path):
    norms = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    fit(module(grad_clip=1e-3), tmp_path, steps=4, callbacks=[Record()])
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-4)


def test_bf16_mixed_runs(tmp_path):  # every other test trains in 32-true
    model = module(disc_start=1)
    fit(model, tmp_path, steps=3, precision="bf16-mixed")  # batch 1: generator only, batch 2: both
    assert model.lr_schedulers()[0].last_epoch == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert next(model.vae.parameters()).dtype == torch.float32


def test_validation_metrics_and_image_grid(tmp_path):
    model = module(disc_start=None, image_every_n_steps=1, num_images=4)
    assert not any(p.requires_grad for p in model.discriminator.parameters())  # GAN off: frozen (DDP-safe)
    t = fit(model, tmp_path, steps=2, limit_val_batches=1)  # validation at the end of the 2-batch epoch
    m = t.callback_metrics
    for key in ("val/loss", "val/rec_loss", "val/psnr", "val/ssim", "val/kl_loss", "val/nll_loss"):
        assert key in m and torch.isfinite(m[key]), key
    x = Squares().images[:8]
    with torch.no_grad():
        r = model.vae(x, sample_posterior=False)[0].clamp(-1, 1)
    mse = ((r - x) / 2).pow(2).flatten(1).mean(1)
    assert m["val/psnr"].item() == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), abs=1e-3)
    images = sorted((tmp_path / "images").glob("*.png"))  # no logger: grids are PNG files
    assert [p.name for p in images] == ["train_reconstructions_0000000.png", "train_reconstructions_0000001.png",
                                        "val_reconstructions_0000002.png"]
    grid = tensor_rows_grid([x, r], 4)
    assert grid.size == (4 * 16, 2 * 16)


def test_export_round_trip_and_scale(tmp_path):
    model = module(disc_start=None)
    data = Squares()
    out = model.export(tmp_path / "vae", data)
    part = load_part(out)
    assert isinstance(part, AutoencoderKL)
    x = data.images
    with torch.no_grad():
        model.vae.eval()
        assert torch.equal(part.decode(part.encode(x).mode()), model.vae.decode(model.vae.encode(x).mode()))
        z = part.encode_latents(x)  # export_batches=2 x batch 8 = all 16 images
        assert z.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert z.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(part.decode_latents(z), part.decode(part.encode(x).mode()), atol=1e-5, rtol=1e-4)
    again = load_part(model.export(tmp_path / "vae2", Squares()))
    assert again.config == part.config  # deterministic: same batches, posterior mode
    with pytest.raises(ValueError, match="datamodule"):
        module().export(tmp_path / "nope")


def test_checkpoint_resumes_mid_run(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "ckpt"
    model = module(disc_start=2, lr_schedule={"decay": "cosine", "warmup_steps": 1})
    fit(model, tmp_path, steps=4, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2)])
    ckpt = load_checkpoint(ckpt_dir / "last.ckpt")  # weights_only=True
    assert ckpt["ldm_class_path"] == "ldm.models.autoencoder.AutoencoderModule"
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3  # 2 generator-only batches + 1 with the discriminator
    resumed = module(disc_start=2, lr_schedule={"decay": "cosine", "warmup_steps": 1})
    t = trainer(tmp_path, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(resumed, datamodule=Squares(), ckpt_path=str(ckpt_dir / "last.ckpt"), weights_only=True)
    assert resumed.lr_schedulers()[0].last_epoch == 5 and t.global_step == 8
    # the schedule continued where it stopped: cosine over 2 + ceil((8 - 2) / 2) = 5 batches
    lr = resumed.optimizers()[0].param_groups[0]["lr"]
    assert resumed.planned_steps() == 5
    assert lr == pytest.approx(2e-3 * resumed.lr_factor(5))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="lpips_path"):
        module(perceptual_weight=1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        module(lr_schedule={"decay": "linear"})
    with pytest.raises(ValueError, match="disc_loss"):
        module(disc_loss="wgan")
    m = module(lr_schedule={"decay": "cosine"})
    with pytest.raises(ValueError, match="decay_steps"):
        m.configure_optimizers()
    schedule = {"decay": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "decay_steps": 10}
    assert math.isclose(module(lr_schedule=schedule).lr_factor(0), 0.5)


def test_perceptual_term_from_local_lpips_weights(tmp_path):
    from safetensors.torch import save_file

    from ldm.modules.lpips import LPIPS

    torch.manual_seed(0)
    save_file(LPIPS().state_dict(), str(tmp_path / "lpips.safetensors"))
    model = module(perceptual_weight=1.0, lpips_path=str(tmp_path / "lpips.safetensors"))
    assert not any(p.requires_grad for p in model.perceptual.parameters())
    x = Squares().images[:2]
    recon, post = model.vae(x)
    with_p = model.reconstruction_terms(x, recon, post)["rec_loss"]
    model.perceptual = None
    without = model.reconstruction_terms(x, recon, post)["rec_loss"]
    assert with_p > without


def _scale_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        z = (rank * 2.0) + (rank + 1.0) * torch.randn(4, 4, 8, 8, generator=g)  # different data per rank
        torch.save(torch.tensor(latent_scale_and_shift([z]), dtype=torch.float64), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import Lightning
def test_latent_scale_is_identical_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_scale_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    both = torch.cat([r * 2.0 + (r + 1.0) * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(r))
                      for r in (0, 1)]).double()
    assert torch.equal(r0, r1)
    assert r0.tolist() == pytest.approx([1 / both.std(unbiased=False).item(), both.mean().item()], rel=1e-9)


def test_posterior_logvar_init_sets_only_the_logvar_bias():
    default, small = module(), module(posterior_logvar_init=-6.0)
    assert torch.equal(small.vae.quant_conv.bias[:4], default.vae.quant_conv.bias[:4])  # same seed, means untouched
    assert torch.equal(small.vae.quant_conv.bias[4:], torch.full((4,), -6.0))
    x = Squares().images[:4]
    with torch.no_grad():
        assert small.vae.encode(x).std.mean() < 0.2 * default.vae.encode(x).std.mean()
