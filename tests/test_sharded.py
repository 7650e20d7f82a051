"""FSDP (FSDP2 through ``ShardedStrategy``) in 2 CPU processes on gloo: the LDM with its EMA sharded, full and
sharded checkpoints (weights-only), resume from both, export from a sharded folder.

Lightning's ``FSDPStrategy`` (FSDP1) cannot run here: torch refuses CPU devices for it. The ranks are started
like torchrun starts them (this file is their script), as in ``test_distributed.py``, whose tiny modules and
in-memory data they reuse; the test process compares them with a 1-process run of twice the batch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # when run as a rank's script

from test_distributed import BATCH, STEPS, WORLD, build, launch_script, make_trainer, train  # noqa: E402
from tiny_parts import export_tiny_parts  # noqa: E402

from ldm.models.base import CLASS_KEY, DATAMODULE_KEY  # noqa: E402
from ldm.training.sharded import ShardedStrategy, full_tensor, is_sharded_checkpoint, load_sharded_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow  # two processes training five times: about a minute on 2 shared cores


def _gathered_ema(model) -> dict[str, torch.Tensor]:
    return {n: full_tensor(s).detach().clone() for n, s in zip(model.ema.names, model.ema.shadow)}


def _full_weights(model) -> dict[str, torch.Tensor]:
    return {k: full_tensor(v).detach().clone() for k, v in model.denoiser.state_dict().items()}


def rank_main(spec_file: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    out, rank = Path(spec["out"]), int(os.environ["RANK"])
    report: dict[str, Any] = {}
    for sharded in (False, True):
        tag = "sharded" if sharded else "full"
        strategy = ShardedStrategy(process_group_backend="gloo", sharded_checkpoint=sharded)
        run = train("ldm", spec["parts"], out / tag, WORLD, BATCH, validate=not sharded, strategy=strategy)
        model, trainer = run["model"], run["trainer"]
        report[tag] = {"step": trainer.global_step, "dtensor_ema": type(model.ema.shadow[0]).__name__,
                       "local_ema_numel": int(model.ema.shadow[0].to_local().numel()),
                       "full_ema_numel": int(model.ema.shadow[0].numel())}
        torch.save({"ema": _gathered_ema(model), "weights": _full_weights(model)}, out / f"{tag}-rank{rank}.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.save_checkpoint(out / f"{tag}.ckpt")
            model.export(out / f"{tag}-export", datamodule=run["data"])  # gathers the sharded EMA on every rank
    for tag in ("full", "sharded"):  # resume each checkpoint for two more steps
        strategy = ShardedStrategy(process_group_backend="gloo", sharded_checkpoint=tag == "sharded")
        model = build("ldm", spec["parts"])
        from test_distributed import MemoryData

        trainer = make_trainer(out / f"resume-{tag}", WORLD, STEPS + 2, [], strategy=strategy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=MemoryData(BATCH, WORLD), ckpt_path=str(out / f"{tag}.ckpt"))
        report[f"resume-{tag}"] = {"step": trainer.global_step}
        torch.save({"ema": _gathered_ema(model), "weights": _full_weights(model)}, out / f"resume-{tag}-rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp")
    parts = [str(p) for p in export_tiny_parts(root / "parts")]
    (root / "spec.json").write_text(json.dumps({"out": str(root), "parts": parts}))
    start = time.perf_counter()
    launch_script(__file__, root / "spec.json", WORLD)
    print(f"2 FSDP ranks done in {time.perf_counter() - start:.0f} s")
    return {"root": root, "parts": parts, "reports": [json.loads((root / f"rank{r}.json").read_text())
                                                      for r in range(WORLD)]}


def _load(root: Path, name: str) -> dict[str, Any]:
    return torch.load(root / name, weights_only=True)


def test_parameters_and_the_ema_are_split_over_the_ranks(fsdp):
    for report in fsdp["reports"]:
        for tag in ("full", "sharded"):
            assert report[tag]["step"] == STEPS and report[tag]["dtensor_ema"] == "DTensor"
            assert (report[tag]["local_ema_numel"] * WORLD
                    >= report[tag]["full_ema_numel"] > report[tag]["local_ema_numel"])


def test_fsdp_on_two_ranks_matches_one_process_of_twice_the_batch(fsdp, tmp_path):
    single = train("ldm", fsdp["parts"], tmp_path / "single", 1, WORLD * BATCH)["model"]
    ranks = [_load(fsdp["root"], f"full-rank{r}.pt") for r in range(WORLD)]
    for name, value in single.denoiser.state_dict().items():
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=2e-5)
    for name, value in zip(single.ema.names, single.ema.shadow):
        torch.testing.assert_close(ranks[0]["ema"][name], value, rtol=1e-4, atol=2e-5)


def test_exports_carry_the_gathered_ema_and_a_sharded_folder_exports_the_same(fsdp):
    from ldm.io import load_part
    from ldm.models.checkpoint import rebuild_from_checkpoint

    root = fsdp["root"]
    gathered = _load(root, "full-rank0.pt")["ema"]
    exported = load_part(root / "full-export" / "unet", kind="denoiser").state_dict()
    for name, value in gathered.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
    assert is_sharded_checkpoint(root / "sharded.ckpt") and not (root / "sharded.ckpt" / ".metadata").exists()
    assert sorted(p.name for p in (root / "sharded.ckpt").iterdir()) == ["meta.pt", "shard-00000.pt", "shard-00001.pt"]
    whole = load_sharded_checkpoint(root / "sharded.ckpt")
    sharded_run = _load(root, "sharded-rank0.pt")
    for name, value in sharded_run["weights"].items():
        torch.testing.assert_close(whole["state_dict"][f"denoiser.{name}"], value, rtol=0, atol=0)
    # `ldm export --ckpt FOLDER`: the folder names the test's LDM subclass; name the registered class instead
    copy = root / "sharded-registered.ckpt"
    shutil.copytree(root / "sharded.ckpt", copy)
    meta = torch.load(copy / "meta.pt", weights_only=True)
    meta.pop(DATAMODULE_KEY)  # and its in-memory test data
    torch.save({**meta, CLASS_KEY: "ldm.models.latent_diffusion.LatentDiffusion"}, copy / "meta.pt")
    model, _, _ = rebuild_from_checkpoint(copy)
    for name, value in zip(model.ema.names, model.ema.shadow):
        torch.testing.assert_close(value, sharded_run["ema"][name], rtol=0, atol=0)


def test_resume_from_a_full_file_and_from_a_sharded_folder_continues_alike(fsdp):
    root = fsdp["root"]
    for report in fsdp["reports"]:
        assert report["resume-full"]["step"] == report["resume-sharded"]["step"] == STEPS + 2
    full, sharded = _load(root, "resume-full-rank0.pt"), _load(root, "resume-sharded-rank0.pt")
    before = _load(root, "full-rank0.pt")["weights"]
    for name, value in full["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], value, rtol=1e-5, atol=1e-6)
    assert any((full["weights"][n] - before[n]).abs().max() > 0 for n in before)   # it trained on


if __name__ == "__main__":
    rank_main(sys.argv[1])
