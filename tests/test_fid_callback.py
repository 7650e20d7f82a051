"""FDCallback: logs FD in CLIP space (+ shapes adherence) every N validation runs during `fit`, and its
torchmetrics states sum over DDP ranks to the statistics of the whole fixed set (2 gloo processes)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from tiny_parts import tiny_image_encoder, tiny_pipeline
from torch import nn

from ldm.evaluation import fid
from ldm.evaluation.callback import FDCallback
from ldm.evaluation.sweep import caption_adherence
from ldm.io import save_part


class PipelineModule(pl.LightningModule):
    """Trains one dummy weight; ``pipeline()`` returns a fixed tiny text-to-image pipeline."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.pipe = tiny_pipeline()

    def pipeline(self):
        return self.pipe

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.w - batch[0].mean()) ** 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, shapes_dir):
    """An exported CLIP image tower and a (barely trained) shapes probe."""
    from ldm.evaluation.shapes_probe import train_probe

    root = tmp_path_factory.mktemp("fd_parts")
    save_part(tiny_image_encoder(), root / "image_encoder")
    train_probe(shapes_dir, root / "probe", steps=3, batch_size=32, max_train=64, max_val=16, log=None)
    return root


def make_callback(parts, shapes_dir, **kwargs) -> FDCallback:
    return FDCallback(data_dir=str(shapes_dir), image_encoder=str(parts / "image_encoder"), probe=str(parts / "probe"),
                      n=kwargs.pop("n", 12), steps=2, batch_size=8, **kwargs)


def test_callback_logs_fd_every_n_validations_and_matches_a_direct_computation(tmp_path, parts, shapes_dir):
    callback = make_callback(parts, shapes_dir, every_n_validations=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1)), batch_size=4)
    trainer = pl.Trainer(max_steps=4, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                         callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    module = PipelineModule()
    trainer.fit(module, data, data)
    # 4 validation runs (the sanity check does not count): evaluated at the 2nd and the 4th
    assert callback.runs == 4 and [step for step, _ in callback.history] == [2, 4]
    values = callback.history[-1][1]
    assert set(values) == {"fd_clip", "adherence_color", "adherence_shape", "adherence_position", "adherence_all_three"}
    assert trainer.callback_metrics["val/fd_clip"].item() == pytest.approx(values["fd_clip"])
    assert all(0 <= values[f"adherence_{k}"] <= 1 for k in ("color", "shape", "position", "all_three"))
    # the same number from the images themselves: CLIP features → Fréchet distance
    extractor = fid.CLIPImageFeatures(tiny_image_encoder())
    generated = callback.generate(module.pipe)
    expected = fid.frechet_distance(fid.extract_features(extractor, callback.real.images),
                                    fid.extract_features(extractor, generated))
    assert values["fd_clip"] == pytest.approx(expected, rel=1e-5)
    by_hand = caption_adherence(callback.probe, generated, callback.real.metas)
    assert values["adherence_color"] == pytest.approx(by_hand["color"])


def test_callback_refuses_a_module_without_a_pipeline(parts, shapes_dir):
    callback = make_callback(parts, shapes_dir)
    with pytest.raises(TypeError, match="pipeline"):
        callback.setup(None, pl.LightningModule(), "fit")
    with pytest.raises(FileNotFoundError, match="probe"):
        FDCallback(data_dir=str(shapes_dir), image_encoder=str(parts / "image_encoder"), probe=str(parts / "nope"))


def _rank(rank: int, world: int, init: str, parts, shapes_dir, out) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        values = make_callback(parts, shapes_dir).evaluate(tiny_pipeline(), rank, world)
        (out / f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_sync_to_the_statistics_of_the_whole_set(tmp_path, parts, shapes_dir):
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'pg'}", parts, shapes_dir, tmp_path), nprocs=2,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == pytest.approx(ranks[1], rel=1e-9)
    # single process, no process group: each rank's share generated separately, statistics of the union
    callback = make_callback(parts, shapes_dir)
    pipe = tiny_pipeline()
    callback.evaluate(pipe)  # loads the fixed set
    real = callback.real
    shares = [callback.generate(pipe, r, 2) for r in range(2)]
    extractor = fid.CLIPImageFeatures(tiny_image_encoder())
    expected = fid.frechet_distance(fid.extract_features(extractor, real.images),
                                    fid.extract_features(extractor, torch.cat(shares)))
    assert ranks[0]["fd_clip"] == pytest.approx(expected, rel=1e-5)
    union = caption_adherence(callback.probe, torch.cat(shares), real.metas[0::2] + real.metas[1::2])
    for key in ("color", "shape", "position", "all_three"):
        assert ranks[0][f"adherence_{key}"] == pytest.approx(union[key], rel=1e-6)
    single = callback.evaluate(pipe)["fd_clip"]  # one rank, one seed: a different (valid) generated set
    assert single > 0 and single != pytest.approx(expected, rel=1e-3)
