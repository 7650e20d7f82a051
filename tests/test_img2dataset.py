"""An img2dataset download as it comes (flat shards + *_stats.json, no val/, no info.json) trains unchanged."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from ldm.data.img2dataset import carve_validation, count_tar_samples, held_out, shard_counts
from ldm.data.shards import read_shard, write_shard
from ldm.data.webdata import EpochLoader, WebDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import TinyImageModel  # noqa: E402


def write_img2dataset_folder(root: Path, per_shard: list[int], stats: list[bool], seed: int = 0) -> list[str]:
    """Shards the way img2dataset writes them: ``00000.tar`` with ``000000000.jpg/.txt/.json`` (its json fields),
    ``00000_stats.json`` beside each shard where ``stats[i]``, and failed downloads counted but absent."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    urls, key = [], 0
    for shard, (n, with_stats) in enumerate(zip(per_shard, stats)):
        samples = []
        for _ in range(n):
            h, w = int(g.integers(20, 60)), int(g.integers(20, 60))
            buffer = io.BytesIO()
            Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
            k = f"{key:09d}"
            meta = {"url": f"https://example.com/{k}.jpg", "key": k, "status": "success", "error_message": None,
                    "width": w, "height": h, "original_width": 2 * w, "original_height": 2 * h, "caption": f"photo {k}"}
            samples.append((k, {"jpg": buffer.getvalue(), "txt": f"photo {k}".encode(),
                                "json": json.dumps(meta).encode()}))
            key += 1
        key += 3  # img2dataset's keys skip the failed downloads
        url = str(root / f"{shard:05d}.tar")
        write_shard(url, samples)
        if with_stats:
            (root / f"{shard:05d}_stats.json").write_text(json.dumps(
                {"count": n + 3, "successes": n, "failed_to_download": 3, "failed_to_resize": 0,
                 "duration": 1.5, "status_dict": {"success": n, "timeout": 3}}))
        urls.append(url)
    return urls


def _quiet(iterable):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(iterable)


def test_counts_come_from_stats_then_tar_headers(tmp_path):
    urls = write_img2dataset_folder(tmp_path / "dl", [7, 5, 6], [True, False, True])
    assert [count_tar_samples(u) for u in urls] == [7, 5, 6]
    counts, source = shard_counts(urls, {}, "train")
    assert counts == dict(zip(urls, [7, 5, 6])) and source == "img2dataset stats + tar headers"
    (tmp_path / "dl" / "00000_stats.json").write_text(json.dumps({"successes": 99}))
    assert shard_counts(urls, {}, "train")[0][urls[0]] == 99   # the stats file is believed (ranks are padded)


def test_flat_folder_gets_a_recorded_held_out_shard_and_equal_length_ranks(tmp_path, capsys):
    root = tmp_path / "dl"
    write_img2dataset_folder(root, [9, 5, 7, 3], [True, True, False, True])
    dm = WebDataModule(str(root), resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4)
    dm.setup("fit")
    assert "validating on 1 of 4 shards" in capsys.readouterr().out
    assert dm.holdout["kind"] == "shards" and len(dm.val_urls) == 1 and len(dm.train_urls) == 3
    assert not set(dm.val_urls) & set(dm.train_urls)
    assert dm.state_dict() == {"holdout": dm.holdout}
    again = WebDataModule(str(root), resolution=16, batch_size=2, num_workers=0)
    again.setup("fit")
    assert again.val_urls == dm.val_urls                         # deterministic from names and seed
    lengths, keys = [], []
    for rank in range(2):
        dm._rank_world = lambda rank=rank: (rank, 2)
        batches = _quiet(dm.train_dataloader())
        lengths.append(len(batches))
        keys.append({k for b in batches for k in b["key"]})
    assert lengths[0] == lengths[1] == len(dm.train_dataloader().dataset)   # no rank waits at the epoch's end
    val_lengths, val_keys = [], []
    for rank in range(2):  # one held-out shard, two ranks: each keeps every other sample of it
        dm._rank_world = lambda rank=rank: (rank, 2)
        batches = _quiet(dm.val_dataloader())
        val_lengths.append(len(batches))
        val_keys.append({k for b in batches for k in b["key"]})
    assert val_lengths[0] == val_lengths[1] and not val_keys[0] & val_keys[1]
    assert val_keys[0] | val_keys[1] == {k for k, _ in read_shard(dm.val_urls[0])}
    assert not (val_keys[0] | val_keys[1]) & (keys[0] | keys[1])
    batch = _quiet(dm.val_dataloader())[0]
    meta = batch["meta"][0]
    assert batch["original_size"][0].tolist() == [meta["original_height"], meta["original_width"]]


def test_a_single_shard_is_split_by_sample_keys(tmp_path):
    root = tmp_path / "one"
    write_img2dataset_folder(root, [40], [True])
    dm = WebDataModule(str(root), resolution=16, batch_size=4, num_workers=0, shuffle_buffer=0, val_fraction=0.25)
    dm.setup("fit")
    assert dm.holdout["kind"] == "samples"
    train = {k for b in _quiet(dm.train_dataloader()) for k in b["key"]}
    val = {k for b in _quiet(dm.val_dataloader()) for k in b["key"]}
    everything = {k for k, _ in read_shard(dm.train_urls[0])}
    assert train | val == everything and not train & val and 0 < len(val) < len(train)
    assert val == {k for k in everything if held_out(k, 0.25, 0)}
    train_share = dm._counts("train")[dm.train_urls[0]]
    assert train_share == 40 - round(40 * 0.25)


def test_carving_refuses_nonsense_and_keeps_old_shards_in_place():
    urls = [f"/d/{i:05d}.tar" for i in range(400)]
    train, val, record = carve_validation(urls, 0.05, seed=1)
    assert 10 <= len(val) <= 30 and record["val_shards"] == [u.rpartition("/")[2] for u in val]
    assert sorted(train + val) == urls
    more = carve_validation(urls + [f"/d/{i:05d}.tar" for i in range(400, 500)], 0.05, seed=1)[1]
    assert set(val) <= set(more)                               # adding shards never moves an old one
    assert len(carve_validation(urls[:3], 0.05, seed=1)[1]) == 1  # at least one, never all
    with pytest.raises(ValueError, match="val_fraction"):
        carve_validation(urls, 0.0)


def test_a_flat_download_trains_and_validates_as_it_is(tmp_path):
    root = tmp_path / "dl"
    write_img2dataset_folder(root, [6, 6, 6], [True, True, True])
    dm = WebDataModule(str(root), resolution=16, batch_size=3, num_workers=0, shuffle_buffer=0)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=2, val_check_interval=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyImageModel(), datamodule=dm)
    assert trainer.global_step == 4 and "val/loss" in trainer.callback_metrics
    assert isinstance(dm.train_dataloader(), EpochLoader)
