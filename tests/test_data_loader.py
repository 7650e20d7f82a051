"""WebDataModule / ShardDataset: batch contract, decode, DDP × worker splitting, bad input, flips."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.data.shards import encode_sample, list_shards, read_shard, tar_bytes, write_shard
from ldm.data.webdata import (
    SKIP_REASONS,
    DataSkipWarning,
    EpochLoader,
    ShardDataset,
    WebDataModule,
    decode_image,
    log_skip_reasons,
    log_skipped,
    skipped_count,
)


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _image(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _all_keys(shards: list[str]) -> list[str]:
    return [key for url in shards for key, _ in read_shard(url)]


def test_batches_follow_the_contract(shapes_dir):
    dm = WebDataModule(str(shapes_dir), batch_size=16, num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption", "meta", "key", "original_size", "crop_coords", "skipped",
                          "skip_reasons"} and batch["skip_reasons"] == {}
    assert batch["original_size"].tolist() == [[32, 32]] * 16 and batch["crop_coords"].tolist() == [[0, 0]] * 16
    image = batch["image"]
    assert image.shape == (16, 3, 32, 32) and image.dtype == torch.float32 and image.is_contiguous()
    assert -1.0 <= image.min() < image.max() <= 1.0
    assert len(batch["caption"]) == len(batch["meta"]) == len(batch["key"]) == 16 and skipped_count(batch) == 0
    files = dict(read_shard(dm.train_urls[0]))[batch["key"][0]]
    expected = np.asarray(Image.open(io.BytesIO(files["png"]))).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(image[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert batch["caption"][0] == files["txt"].decode() and batch["meta"][0] == json.loads(files["json"])
    # usable without a Trainer, lengths from info.json, and the val split in file order
    val = list(dm.val_dataloader())
    assert len(val) == len(dm.val_dataloader()) and _keys(val) == _all_keys(dm.val_urls)


def test_two_ranks_two_workers_read_every_sample_once(shapes_dir):
    shards = list_shards(shapes_dir, "train")
    seen = []
    for rank in (0, 1):
        ds = ShardDataset(shards, 32, batch_size=7, shuffle_buffer=40, seed=3, rank=rank, world_size=2,
                          num_workers=2, shard_counts={u: 30 for u in shards})
        loader = EpochLoader(ds, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += _keys(batches)
    counts = Counter(seen)
    assert max(counts.values()) == 1 and set(counts) == set(_all_keys(shards)) and len(seen) == 240


def test_epochs_reshuffle_the_same_samples(shapes_dir):
    dm = WebDataModule(str(shapes_dir), batch_size=32, num_workers=0, shuffle_buffer=50, seed=1)
    loader = dm.train_dataloader()
    first, second = _keys(loader), _keys(loader)
    assert sorted(first) == sorted(second) and first != second and len(first) == 240
    again = _keys(WebDataModule(str(shapes_dir), batch_size=32, num_workers=0, shuffle_buffer=50, seed=1)
                  .train_dataloader())
    assert again == first  # deterministic for a seed


def test_resampled_mode_gives_every_rank_the_same_number_of_batches(shapes_dir):
    shards = list_shards(shapes_dir, "train")
    for rank in (0, 1):
        ds = ShardDataset(shards, 32, batch_size=16, shuffle_buffer=20, samples_per_epoch=100, rank=rank,
                          world_size=2, num_workers=2)
        loader = EpochLoader(ds, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 4  # 2 workers × ceil(25 / 16)
        assert sum(len(b["key"]) for b in batches) == 50


def _bad_dataset(root: Path) -> tuple[list[str], int]:
    """Shards with every kind of bad input; returns the keys that must come through and the bad count."""
    good = [(f"good{i}", encode_sample(_png(_image(i)), f"caption {i}", {"i": i})) for i in range(6)]
    ok_png = _png(_image(99))
    bad = [
        ("truncpng", encode_sample(ok_png[: len(ok_png) // 2], "cut png", {})),
        ("garbage", encode_sample(b"this is not an image at all", "garbage", {})),
        ("nocaption", {"png": ok_png, "json": b"{}"}),
        ("emptycaption", encode_sample(ok_png, "   ", {})),
        ("badjson", {"png": ok_png, "txt": b"bad json", "json": b"{not json"}),
    ]
    extra = [("jpeg", {"jpg": _png(_image(5), "JPEG"), "txt": b"a jpeg"}),
             ("wide", encode_sample(_png(_image(6, 32, 48)), "wide", {}))]
    train = root / "train"
    write_shard(train / "a-0.tar", good[:3] + bad + extra)
    whole = tar_bytes(good[3:])
    (train / "a-1.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-archive
    (train / "a-2.tar").write_bytes(b"\x13" * 3000)  # not a tar at all
    (train / "a-3.tar").write_bytes(b"")  # empty file
    (root / "val").mkdir()
    write_shard(root / "val" / "v-0.tar", good[:2])
    readable = list(read_shard_prefix(train / "a-1.tar"))
    return [k for k, _ in good[:3]] + ["jpeg", "wide"] + readable, len(bad) + 3


def read_shard_prefix(path: Path):
    try:
        for key, _ in read_shard(str(path)):
            yield key
    except Exception:
        return


def test_corrupt_inputs_are_skipped_warned_and_counted(tmp_path):
    expected_keys, n_bad = _bad_dataset(tmp_path)
    assert 0 < len(expected_keys) - 5 < 3  # the truncated shard still yields its complete samples
    dm = WebDataModule(str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=0)
    with pytest.warns(DataSkipWarning) as record:
        batches = list(dm.train_dataloader())
    messages = " ".join(str(w.message) for w in record)
    for word in ("truncpng", "garbage", "nocaption", "emptycaption", "badjson", "a-1.tar", "a-2.tar", "a-3.tar"):
        assert word in messages
    assert sorted(_keys(batches)) == sorted(expected_keys)
    assert sum(skipped_count(b) for b in batches) == n_bad
    assert all(b["image"].shape[1:] == (3, 32, 32) for b in batches)
    # with worker processes the count still reaches the main process through the batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(WebDataModule(str(tmp_path), batch_size=4, num_workers=2, shuffle_buffer=0).train_dataloader())
    assert sum(skipped_count(b) for b in batches) == n_bad and sorted(_keys(batches)) == sorted(expected_keys)


def test_skipped_inputs_are_logged_as_a_metric(tmp_path):
    _, n_bad = _bad_dataset(tmp_path)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            log_skipped(self, batch)
            return self.layer(batch["image"].mean((2, 3))).pow(2).mean()

        def on_train_epoch_end(self):
            log_skip_reasons(self, "train")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = WebDataModule(str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=0, val_split=None)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), dm)
    metrics = trainer.callback_metrics
    assert metrics["train/skipped_samples"].item() == n_bad
    by_reason = {r: metrics[f"train/skipped/{r}"].item() for r in SKIP_REASONS if f"train/skipped/{r}" in metrics}
    assert by_reason == {"corrupt_image": 1, "unknown_format": 1, "missing_caption": 2, "bad_json": 1,
                         "unreadable_shard": 3}  # the reasons that occurred, each once per epoch


def test_missing_shards_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        WebDataModule(str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no shards in .*empty/train"):
        WebDataModule(str(tmp_path / "empty")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"shard-\*\.tar"):
        list_shards(str(tmp_path / "shard-*.tar"))
    write_shard(tmp_path / "flat" / "00000.tar", [("k", encode_sample(_png(_image(0)), "c", {}))])
    assert list_shards(tmp_path / "flat", "train") == [str(tmp_path / "flat" / "00000.tar")]  # img2dataset
    with pytest.raises(FileNotFoundError, match="val"):
        list_shards(tmp_path / "flat", "val")
    assert list_shards(str(tmp_path / "flat" / "{00000..00000}.tar")) == [str(tmp_path / "flat" / "00000.tar")]


def test_resize_and_crop():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255  # the centre square is white, the sides black
    out = decode_image(_png(wide), 16)
    assert out.shape == (16, 16, 3) and out[:, 1:-1].min() == 255 and out.mean() > 250  # bicubic rings at the rim
    big = _image(1, 64, 64)
    half = decode_image(_png(big), 32)
    expected = np.asarray(Image.fromarray(big).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(half, expected)
    import random
    crops = {decode_image(_png(wide), 16, random.Random(s)).mean() for s in range(8)}
    assert len(crops) > 1  # a random crop moves


def test_hflip_is_refused_when_captions_say_left_or_right(shapes_dir, tmp_path):
    dm = WebDataModule(str(shapes_dir), hflip=True, num_workers=0)
    with pytest.warns(UserWarning, match="hflip=True refused"):
        dm.setup("fit")
    assert dm.hflip is False
    arrays = {f"s{i}": _image(i) for i in range(24)}
    write_shard(tmp_path / "train" / "t.tar",
                [(k, encode_sample(_png(a), "a noisy picture", {})) for k, a in arrays.items()])
    (tmp_path / "val").mkdir()
    write_shard(tmp_path / "val" / "v.tar", [("v", encode_sample(_png(arrays["s0"]), "right side", {}))])
    dm = WebDataModule(str(tmp_path), hflip=True, num_workers=0, batch_size=24, shuffle_buffer=0)
    dm.setup("fit")
    assert dm.hflip is True
    batch = next(iter(dm.train_dataloader()))
    flipped = 0
    for key, image in zip(batch["key"], batch["image"]):
        original = torch.from_numpy(arrays[key]).permute(2, 0, 1).float() / 127.5 - 1
        if torch.allclose(image, original.flip(-1), atol=1e-6):
            flipped += 1
        else:
            assert torch.allclose(image, original, atol=1e-6)
    assert 4 <= flipped <= 20
    ds = ShardDataset([str(tmp_path / "val" / "v.tar")], 32, 1, hflip=True)
    for _ in range(6):  # a caption with "right" is never flipped, even when hflip is on
        image = next(iter(ds))["image"][0]
        assert torch.allclose(image, torch.from_numpy(arrays["s0"]).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)


def test_shard_writer_matches_tarfile_and_the_reader_handles_every_header_kind(tmp_path):
    import tarfile

    samples = [("k1", {"png": b"x" * 700, "txt": b"hello", "json": b"{}"}), ("dir/k2", {"txt": b""})]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(files[ext]), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(files[ext]))
    assert tar_bytes(samples) == buffer.getvalue()  # byte-identical to tarfile's ustar output
    long_key = "d" * 120 + "/ü"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):  # long and non-ASCII names: pax and GNU headers
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in ((f"{long_key}.txt", b"caption"), (f"{long_key}.png", b"png")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert list(read_shard(str(path))) == [(long_key, {"txt": b"caption", "png": b"png"})]
    write_shard(tmp_path / "w.tar", [(long_key, {"txt": b"c"})])  # the writer falls back to pax
    assert list(read_shard(str(tmp_path / "w.tar"))) == [(long_key, {"txt": b"c"})]
    with pytest.raises(ValueError, match="contains a dot"):
        tar_bytes([("a.b", {"txt": b""})])
