"""Data-parallel training, tested with 2 CPU processes on gloo for the VAE, CLIP and the LDM U-Net.

The two ranks are started the way torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_RUN_ID in the environment; this file is their script) and run, in one process group:
validate + fit + export of each module under ``DDPStrategy``, a pass over the shard loader, a fit whose
loss is NaN on rank 1 only, and a fit on shards with corrupt samples, a truncated shard and a shard that
vanishes mid-run. The test process then checks the ranks against each other and against 1-process runs
with twice the batch on the same data: randomness that would differ between the two layouts is removed
(the VAE's posterior sample is its mean, the LDM draws noise and timesteps per sample index, CLIP and
the data order are deterministic), so the runs differ only by float summation order.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # when run as a rank's script

from test_budget import SlowRegression  # noqa: E402
from test_faults import Regression, faulty_copy  # noqa: E402
from tiny_model import TinyImageModel  # noqa: E402
from tiny_parts import TINY_UNET, export_tiny_parts  # noqa: E402

from ldm.conditioning import Conditioning  # noqa: E402
from ldm.data.webdata import WebDataModule, log_skip_reasons  # noqa: E402
from ldm.io import load_part  # noqa: E402
from ldm.models.autoencoder import AutoencoderModule  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.models.text_encoder import ContrastiveCLIP  # noqa: E402
from ldm.modules.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.distributions import DiagonalGaussian  # noqa: E402
from ldm.modules.text_encoder import CLIPTextConditioner  # noqa: E402
from ldm.modules.unet import UNet  # noqa: E402
from ldm.training import FitToTimeBudget, PreemptionCheckpoint, ResumableLoader, SeedEveryStep, SkipNonFiniteSteps  # noqa: E402

WORLD, BATCH, STEPS = 2, 4, 3          # per-rank batch; the 1-process reference uses WORLD * BATCH
MODULES = ("vae", "clip", "ldm")
WORDS = ["red", "blue", "green", "pink", "gray", "gold", "teal", "lime"]


# ---- tiny data and modules, built identically in the ranks and in the reference -------------------------
class TinyImageModelByReason(TinyImageModel):
    """Also logs the skip reasons at each epoch end (summed over the ranks)."""

    def on_train_epoch_end(self) -> None:
        log_skip_reasons(self, "train")


def samples(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Images with a coloured square, distinct captions, and the latents/tokens the LDM trains on."""
    g = torch.Generator().manual_seed(offset)
    out = []
    for i in range(offset, offset + n):
        image = (torch.rand(3, 1, 1, generator=g) * 2 - 1).expand(3, 32, 32).clone()
        r, c = torch.randint(0, 16, (2,), generator=g).tolist()
        image[:, r:r + 16, c:c + 16] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        length = int(torch.randint(2, 7, (), generator=g))
        out.append({"image": image, "caption": f"a {WORDS[i % 8]} square number {i}", "key": f"s{i:03d}", "index": i,
                    "latent_mean": torch.randn(4, 4, 4, generator=g), "latent_std": torch.zeros(4, 4, 4),
                    "context": torch.randn(6, 32, generator=g), "mask": torch.arange(6) < length})
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else
             torch.tensor([it[k] for it in items]) if isinstance(items[0][k], int) else [it[k] for it in items]
             for k in items[0]}
    batch["cond"] = Conditioning(batch.pop("context"), batch.pop("mask"))
    return batch


class MemoryData(pl.LightningDataModule):
    """32 training and 8 validation samples.

    Under DDP Lightning gives the training loader a shuffling ``DistributedSampler`` (seed 0): rank r reads
    ``perm[r::2]``, so step k of the two ranks together covers ``perm[2kb:2kb + 2b]``. With ``world=1`` the
    loader reads that same permutation (a 1-replica ``DistributedSampler``), so batch k holds the same samples.
    """

    def __init__(self, batch_size: int, world: int = WORLD) -> None:
        super().__init__()
        self.batch_size, self.world = batch_size, world
        self.train, self.val = samples(32), samples(8, offset=1000)

    def train_dataloader(self) -> DataLoader:
        sampler = (DistributedSampler(self.train, num_replicas=1, rank=0, shuffle=True, seed=0)
                   if self.world == 1 else None)
        return ResumableLoader(self.train, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=collate)


class KeyedNoiseLDM(LatentDiffusion):
    """LatentDiffusion whose noise and timestep depend on the sample, not on the batch it lands in."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0, cond = self.latents_and_conditioning(batch)  # latent_std = 0: z0 is the mean
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens])
        t = torch.stack([torch.randint(0, self.schedule.num_train_timesteps, (), generator=g) for g in gens])
        loss = self.loss(z0, cond, t, noise)
        self.log("train/loss", loss, batch_size=z0.shape[0])
        return loss


def build(name: str, parts: list[str], unet: dict[str, Any] | None = None) -> pl.LightningModule:
    torch.manual_seed(0)
    if name == "vae":
        return AutoencoderModule(vae=dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4,
                                          resolution=32, attn_resolutions=[], mid_attention=False),
                                 optimizer={"lr": 2e-3}, lr_schedule={"warmup_steps": 1}, disc_start=None,
                                 l2_weight=1.0, image_every_n_steps=1,
                                 export_batches=2)
    if name == "clip":
        return ContrastiveCLIP(text={"context_length": 16, "width": 32, "heads": 2, "layers": 1, "embed_dim": 32},
                               image={"image_size": 32, "patch_size": 16, "width": 32, "heads": 2, "layers": 1,
                                      "embed_dim": 32}, optimizer={"lr": 2e-3}, lr_schedule={"warmup_steps": 1},
                               zero_shot=False)
    return KeyedNoiseLDM(vae_path=parts[0], text_encoder_path=parts[1], denoiser={**TINY_UNET, **(unet or {})},
                         resolution=16, lr_schedule={"warmup_steps": 1}, optimizer={"lr": 2e-3}, p_uncond=0.0,
                         ema_decay=0.9, val_prompts=["a red square"], sample_every_n_val=1, sample_steps=2,
                         val_timesteps=2)


class RecordKeys(Callback):
    """The keys of every training batch, and the (all-reduced) gradient of the first optimizer step."""

    def __init__(self) -> None:
        self.keys: list[list[str]] = []
        self.first_gradient: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append(list(batch["key"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first_gradient is None:
            self.first_gradient = torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]
                                             if p.grad is not None])


def make_trainer(root: Path, world: int, steps: int, callbacks: list[Callback], guard: SkipNonFiniteSteps | None = None,
                 **kw: Any) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=world, max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(root), limit_val_batches=0)
    if world > 1:
        args["strategy"] = pl.strategies.DDPStrategy(process_group_backend="gloo")
    args.update(kw)
    callbacks = [SeedEveryStep(seed=0), PreemptionCheckpoint(), guard or SkipNonFiniteSteps(), *callbacks]
    return pl.Trainer(callbacks=callbacks, **args)


def train(name: str, parts: list[str], root: Path, world: int, batch: int, validate: bool = True,
          unet: dict[str, Any] | None = None, **trainer_args: Any) -> dict[str, Any]:
    """validate (initial weights) + fit ``STEPS`` steps; the metrics, the batches seen and the final weights."""
    model, data, record = build(name, parts, unet), MemoryData(batch, world), RecordKeys()
    trainer = make_trainer(root, world, STEPS, [record], limit_val_batches=1.0 if validate else 0, **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.validate(model, datamodule=data, verbose=False)[0] if validate else {}
        trainer.fit(model, datamodule=data)
    return {"model": model, "data": data, "keys": record.keys, "metrics": metrics, "trainer": trainer,
            "gradient": record.first_gradient}


def no_posterior_noise(self: DiagonalGaussian, generator: torch.Generator | None = None) -> torch.Tensor:
    return self.mean


class PoisonRankOne(Regression):
    """NaN loss on rank 1 only, at its second batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and batch_idx == 1 else loss


class Vanish(Callback):
    """Rank 0 deletes ``path`` (a shard rank 1 has not read yet) after the first batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and batch_idx == 0:
            Path(self.path).unlink()


# ---- what each rank runs ---------------------------------------------------------------------------------
def rank_main(spec_file: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    out, rank = Path(spec["out"]), int(os.environ["RANK"])
    faulthandler.dump_traceback_later(spec.get("dump_stacks_after", 400))  # a hang leaves its stack in the log
    DiagonalGaussian.sample = no_posterior_noise
    report: dict[str, Any] = {}
    start = time.perf_counter()
    print(f"started {time.time() - float(os.environ.get('LDM_TEST_LAUNCHED', time.time())):.1f} s after launch",
          flush=True)
    for name in spec.get("modules", MODULES):
        run = train(name, spec["parts"], out / name, WORLD, BATCH)
        print(f"{name}: trained in {time.perf_counter() - start:.1f} s", flush=True)
        model = run["model"]
        torch.save(model.state_dict(), out / f"{name}-rank{rank}.pt")
        torch.save(run["gradient"], out / f"{name}-gradient-rank{rank}.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(out / f"{name}-export", datamodule=run["data"])  # every rank calls it
        print(f"{name}: exported at {time.perf_counter() - start:.1f} s", flush=True)
        report[name] = {"keys": run["keys"], "metrics": run["metrics"], "step": run["trainer"].global_step}
    if not spec.get("extras", True):
        return

    # gradient accumulation: 2 ranks x 2 samples x 2 micro-batches per optimizer step = the 1-process batch of 8
    run = train("ldm", spec["parts"], out / "ldm-accumulate", WORLD, BATCH // 2, validate=False,
                accumulate_grad_batches=2)
    torch.save(run["model"].state_dict(), out / f"ldm-accumulate-rank{rank}.pt")
    # bf16 autocast and activation checkpointing of the U-Net blocks under DDP
    run = train("ldm", spec["parts"], out / "ldm-bf16", WORLD, BATCH, validate=False, precision="bf16-mixed",
                unet={"gradient_checkpointing": True})
    torch.save(run["model"].state_dict(), out / f"ldm-bf16-rank{rank}.pt")
    print(f"accumulation, bf16: done in {time.perf_counter() - start:.1f} s", flush=True)

    # a wall-clock budget: rank 1 steps slower; the plan is rank 0's, broadcast, so both stop at the same step
    slow = SlowRegression(delay=0.01 * (1 + rank))
    trainer = make_trainer(out / "budget", WORLD, 100_000, [FitToTimeBudget(every=10, margin=0.15)],
                           max_time={"seconds": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(slow, DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4))
    report["budget"] = {"step": trainer.global_step, "max_steps": trainer.max_steps, "last_factor": slow.factors[-1]}

    shards = WebDataModule(spec["shapes"], batch_size=16, num_workers=0, shuffle_buffer=32)
    report["shard_keys"] = [k for batch in shards.train_dataloader() for k in batch["key"]]

    poisoned, guard = PoisonRankOne(), SkipNonFiniteSteps(max_consecutive=3)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    loader = ResumableLoader(list(zip(x, x.sum(1))), batch_size=4, shuffle=False)
    trainer = make_trainer(out / "nan", WORLD, 4, [], guard=guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(poisoned, loader)
    torch.save(torch.stack(poisoned.history), out / f"nan-rank{rank}.pt")
    report["nan"] = {"skipped": guard.skipped}

    counted = RecordKeys()
    faulty = WebDataModule(spec["faulty"], batch_size=16, num_workers=0, shuffle_buffer=0, val_split=None)
    trainer = make_trainer(out / "faults", WORLD, -1, [Vanish(spec["vanish"]), counted], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyImageModelByReason(), faulty)
    report["faults"] = {"steps": trainer.global_step, "samples": sum(len(k) for k in counted.keys),
                        "skipped": trainer.callback_metrics["train/skipped_samples"].item(),
                        "reasons": {k.rpartition("/")[2]: v.item() for k, v in trainer.callback_metrics.items()
                                    if k.startswith("train/skipped/")}}
    print(f"all done in {time.perf_counter() - start:.1f} s", flush=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()  # a clean exit: gloo's threads stopped before the interpreter


# ---- the test process: launch, then compare ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec_file: Path, world: int, timeout: float = 420) -> None:
    """Start ``world`` ranks of this file like torchrun does; fail with their output on error or hang."""
    launch_script(__file__, spec_file, world, timeout)


def launch_script(script: str, spec_file: Path, world: int, timeout: float = 420) -> None:
    """Start ``world`` ranks of ``script`` (run with ``spec_file``) like torchrun does; fail with their output."""
    common = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
              "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "ldm-test",
              "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "LDM_TEST_LAUNCHED": str(time.time())}
    logs = [spec_file.parent / f"rank{r}.log" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(spec_file)],
                              env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=open(log, "w"), stderr=subprocess.STDOUT) for r, log in enumerate(logs)]
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()  # a rank died: the others would wait for it forever
            if failed_at is not None and time.monotonic() > failed_at + 10:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * world:
        tails = "\n".join(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + log.read_text()[-4000:]
                          for r, log in enumerate(logs))
        pytest.fail(f"DDP ranks failed or hung (exit codes {codes}):\n{tails}")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, shapes_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    parts = [str(p) for p in export_tiny_parts(root / "parts")]
    shards, readable = faulty_copy(shapes_dir, root / "faulty", {0: 3, 1: 3, 2: 3, 3: 3}, truncate=5)
    spec = {"out": str(root), "parts": parts, "shapes": str(shapes_dir), "faulty": str(root / "faulty"),
            "vanish": shards[7]}
    (root / "spec.json").write_text(json.dumps(spec))
    launch(root / "spec.json", WORLD)
    reports = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"root": root, "parts": parts, "reports": reports, "readable": readable}


@pytest.fixture(scope="module")
def single(ddp, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The same trainings in this process: one rank, batch WORLD * BATCH."""
    root = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiagonalGaussian, "sample", no_posterior_noise)
        return {name: train(name, ddp["parts"], root / name, 1, WORLD * BATCH) for name in MODULES}


def weights(ddp: dict[str, Any], name: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(ddp["root"] / f"{name}-rank{rank}.pt", weights_only=True)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def drift(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ relative to how far training moved the weights (‖a − start‖)."""
    return ((flat(a) - flat(b)).norm() / (flat(a) - flat(start)).norm()).item()


def initial(name: str, parts: list[str]) -> dict[str, torch.Tensor]:
    return dict(build(name, parts).state_dict())


@pytest.mark.parametrize("name", MODULES)
def test_ranks_hold_identical_weights(ddp, name):
    a, b = weights(ddp, name, 0), weights(ddp, name, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(r[name]["step"] == STEPS for r in ddp["reports"])


@pytest.mark.parametrize("name", MODULES)
def test_two_ranks_of_b_match_one_process_of_2b(ddp, single, name):
    # the averaged gradient of the first step (same weights in both layouts): equal to float rounding
    ours, theirs = single[name]["gradient"], torch.load(ddp["root"] / f"{name}-gradient-rank0.pt", weights_only=True)
    gradient_error = ((ours - theirs).norm() / ours.norm()).item()
    assert gradient_error < 1e-5, gradient_error
    # after STEPS AdamW steps (Adam's g/√v amplifies rounding where a gradient is ~0): still the same run
    final = dict(single[name]["model"].state_dict())
    weight_error = drift(final, weights(ddp, name, 0), initial(name, ddp["parts"]))
    print(f"DDP 2x{BATCH} vs 1x{WORLD * BATCH} {name}: first gradient {gradient_error:.1e}, "
          f"weights after {STEPS} steps {weight_error:.1e} (relative)")
    assert weight_error < 2e-3, weight_error


@pytest.mark.parametrize("name", MODULES)
def test_each_rank_gets_its_own_half_of_the_global_batch(ddp, single, name):
    per_rank = [r[name]["keys"] for r in ddp["reports"]]
    for step, global_batch in enumerate(single[name]["keys"]):
        halves = [set(keys[step]) for keys in per_rank]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(global_batch)


def test_shard_loader_splits_samples_disjointly_across_ranks(ddp, shapes_dir):
    keys = [set(r["shard_keys"]) for r in ddp["reports"]]
    assert all(len(k) == len(r["shard_keys"]) for k, r in zip(keys, ddp["reports"]))  # no repeats within a rank
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 240


@pytest.mark.parametrize("name,metrics", [("vae", ["val/psnr", "val/ssim", "val/loss"]),
                                          ("clip", ["val/recall_t2i@1", "val/recall_i2t@1", "val/recall_t2i@5"])])
def test_validation_metrics_are_gathered_over_ranks(ddp, single, name, metrics):
    for metric in metrics:  # computed on the initial weights: the same model in both layouts
        reference = single[name]["metrics"][metric]
        for report in ddp["reports"]:
            assert report[name]["metrics"][metric] == pytest.approx(reference, rel=1e-5, abs=1e-6), metric
    ldm = [r["ldm"]["metrics"]["val/loss"] for r in ddp["reports"]]
    assert ldm[0] == ldm[1]  # synced: one value on both ranks


def test_exports_are_written_once_from_identical_weights(ddp):
    root = ddp["root"]
    assert not list(root.glob("*-export/**/*.tmp")) and not list(root.glob("*-export/**/.*"))
    rank0 = {name: weights(ddp, name, 0) for name in MODULES}
    vae = load_part(root / "vae-export", AutoencoderKL)
    assert all(torch.equal(v, rank0["vae"][f"vae.{k}"]) for k, v in vae.state_dict().items())
    module = build("vae", ddp["parts"])
    module.load_state_dict(rank0["vae"])
    scale, shift = module.measure_latent_scale(MemoryData(BATCH).train_dataloader(), 2)
    assert vae.config.scaling_factor == pytest.approx(scale, rel=1e-6)  # the all-reduced statistics
    assert vae.config.shift_factor == pytest.approx(shift, rel=1e-6, abs=1e-9)
    text = load_part(root / "clip-export", CLIPTextConditioner)
    assert all(torch.equal(v, rank0["clip"][f"text.{k}"]) for k, v in text.state_dict().items())
    ldm = build("ldm", ddp["parts"])
    ldm.load_state_dict(rank0["ldm"])
    unet = load_part(root / "ldm-export" / "unet", UNet)
    expected = ldm.pipeline(use_ema=True).denoiser.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items())


def test_gradient_accumulation_under_ddp_matches_one_process_of_the_whole_batch(ddp, single):
    accumulated = [torch.load(ddp["root"] / f"ldm-accumulate-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(accumulated[0][k], accumulated[1][k]) for k in accumulated[0])
    error = drift(dict(single["ldm"]["model"].state_dict()), accumulated[0], initial("ldm", ddp["parts"]))
    print(f"DDP with gradient accumulation vs 1 process, ldm: weights {error:.1e} (relative)")
    assert error < 2e-3, error


def test_bf16_autocast_and_activation_checkpointing_run_under_ddp(ddp):
    runs = [torch.load(ddp["root"] / f"ldm-bf16-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(torch.isfinite(v).all() for v in runs[0].values() if v.is_floating_point())
    start = initial("ldm", ddp["parts"])
    assert not torch.equal(runs[0]["denoiser.conv_out.weight"], start["denoiser.conv_out.weight"])


def test_time_budget_plan_is_shared_by_the_ranks(ddp):
    budgets = [r["budget"] for r in ddp["reports"]]
    assert budgets[0] == budgets[1]                       # same plan, same last step, same LR on both ranks
    assert budgets[0]["step"] == budgets[0]["max_steps"] < 100_000
    assert budgets[0]["last_factor"] < 0.05                # the cosine ran to its end inside max_time


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(ddp):
    histories = [torch.load(ddp["root"] / f"nan-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(histories[0], histories[1])  # still in step
    assert torch.equal(histories[0][1], histories[0][0]) and not torch.equal(histories[0][2], histories[0][1])
    assert [r["nan"]["skipped"] for r in ddp["reports"]] == [1, 1]


def test_corrupt_truncated_and_vanishing_shards_do_not_desync_ranks(ddp):
    faults = [r["faults"] for r in ddp["reports"]]
    # one-pass epoch: each rank runs as many steps as the longest rank (120 samples / 16 → 8) ...
    assert [f["steps"] for f in faults] == [8, 8]
    # ... rank 1 (shards 1, 3, 5 cut, 7 vanished) repeats its own samples to keep up
    first_pass = 27 + 27 + ddp["readable"]  # rank 1's good samples: shards 1 and 3 (3 corrupt each), 5 (cut)
    assert faults[0]["samples"] == 120 - 6
    assert faults[1]["samples"] == first_pass + 16 * (8 - math.ceil(first_pass / 16))
    # every bad input counted once over both ranks: 12 corrupt, the cut shard and the vanished one
    assert faults[0]["skipped"] == faults[1]["skipped"] == 12 + 1 + 1
    assert faults[0]["reasons"] == faults[1]["reasons"] == {"unknown_format": 12, "unreadable_shard": 2}


# ---- the real `ldm fit` with configs/trainer/ddp-cpu.yaml (slow: Lightning starts the second process) ------
@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_ldm_fit_with_the_ddp_cpu_config(tmp_path, compiled):
    import yaml
    from test_resume import write_latent_cache

    parts = [str(p) for p in export_tiny_parts(tmp_path / "parts")]
    cache = write_latent_cache(tmp_path / "cache", parts)
    config = {"model": {"class_path": "ldm.models.latent_diffusion.LatentDiffusion",
                        "init_args": {"vae_path": parts[0], "text_encoder_path": parts[1], "denoiser": TINY_UNET,
                                      "resolution": 16, "lr_schedule": {"warmup_steps": 2},
                                      "sample_every_n_val": 0}},
              "data": {"class_path": "ldm.data.latents.LatentDataModule",
                       "init_args": {"cache_dir": str(cache), "batch_size": 4}},
              "trainer": {"default_root_dir": str(tmp_path / "run"), "max_steps": 4, "limit_val_batches": 1,
                          "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_progress_bar": False}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "ldm"), "fit", "--config", str(tmp_path / "tiny.yaml"),
               "--config", str(TESTS.parent / "configs" / "trainer" / "ddp-cpu.yaml")]
    if compiled:
        command += ["--trainer.callbacks+=ldm.training.CompileModules", "--trainer.callbacks.modules=[denoiser]"]
    done = subprocess.run(command, cwd=TESTS.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "MEMBER: 2/2" in done.stdout + done.stderr
    from ldm.io import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


if __name__ == "__main__":
    rank_main(sys.argv[1])
