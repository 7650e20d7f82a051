"""Aspect-ratio buckets: the bucket set, assignment, the shared DDP schedule, odd real images, the loader."""

from __future__ import annotations

import io
import math
import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import (
    BucketSpec,
    assign_bucket,
    bucket_counts,
    bucket_schedule,
    cover_crop,
    cover_scale,
    make_buckets,
    resize_to_bucket,
)
from ldm.data.shards import encode_sample, write_shard
from ldm.data.webdata import EpochLoader, ShardDataset, WebDataModule


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _shards(root, sizes, n_shards=4, per_shard=12, seed=0):
    """Shards of flat-coloured RGB images cycling through ``sizes`` (width, height); returns the urls."""
    rng = random.Random(seed)
    urls = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            w, h = sizes[(s * per_shard + i) % len(sizes)]
            image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
            samples.append((f"s{s}_{i:03d}", encode_sample(_encode(image), f"image {s} {i}", {})))
        url = str(root / f"{s:05d}.tar")
        write_shard(url, samples)
        urls.append(url)
    return urls


@pytest.mark.parametrize("area,step,max_aspect", [(4096, 16, 4.0), (4096, 32, 4.0), (1024 ** 2, 64, 2.5),
                                                  (96 * 96, 8, 3.0)])
def test_buckets_have_about_the_target_area_and_cover_both_orientations(area, step, max_aspect):
    buckets = make_buckets(area, step, max_aspect)
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert area - step * max(w, h) < w * h <= area            # h is the largest grid height under the area
        assert max(w, h) / min(w, h) <= max_aspect
        assert (h, w) in buckets                                   # landscape and portrait alike
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_every_image_lands_in_exactly_one_nearest_bucket_and_is_never_stretched_too_far():
    spec = BucketSpec(area=4096, step=16, max_aspect=4.0, max_upscale=2.0)
    buckets = spec.buckets()
    rng = random.Random(0)
    sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(2000)] + [(1, 4000), (4000, 1), (64, 64)]
    for size in sizes:
        b = assign_bucket(size, buckets)
        distance = [abs(math.log(bw / bh) - math.log(size[0] / size[1])) for bw, bh in buckets]
        assert distance[b] == min(distance)                        # the nearest aspect ratio (one index)
        (nw, nh), (top, left) = cover_crop(size, buckets[b], random.Random(1))
        assert nw >= buckets[b][0] and nh >= buckets[b][1]           # the resized image covers its bucket
        assert 0 <= left <= nw - buckets[b][0] and 0 <= top <= nh - buckets[b][1]
    histogram = Counter(sizes)
    counts = bucket_counts(histogram, spec)
    kept = sum(n for size, n in histogram.items()
               if cover_scale(size, buckets[assign_bucket(size, buckets)]) <= spec.max_upscale)
    assert sum(counts) == kept < len(sizes)                         # tiny images and strips are left out
    assert cover_scale((1, 4000), buckets[assign_bucket((1, 4000), buckets)]) > spec.max_upscale


def test_resize_to_bucket_resamples_only_the_kept_region():
    image = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (50, 1, 3)))  # a ramp, 200x50
    out, (top, left) = resize_to_bucket(image, (128, 32))
    assert out.size == (128, 32) and top == 0
    full = image.resize((128, 32), Image.BICUBIC, box=(left * 200 / 128, 0, (left + 128) * 200 / 128, 50))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full))
    assert abs(int(np.asarray(out)[0, 64, 0]) - 100) <= 2         # the centre column keeps its value


def test_schedule_follows_the_counts_and_depends_only_on_seed_and_epoch():
    counts = [50, 30, 20, 0]
    plan = bucket_schedule(counts, 10, seed=3, epoch=1)
    assert Counter(plan) == {0: 5, 1: 3, 2: 2}
    assert plan == bucket_schedule(counts, 10, seed=3, epoch=1)
    assert any(bucket_schedule(counts, 10, seed=3, epoch=e) != plan for e in range(2, 6))
    assert Counter(bucket_schedule([1, 1, 1], 4, 0, 0)) in ({0: 2, 1: 1, 2: 1},)  # largest remainders, ties by index


SIZES = [(64, 64), (128, 40), (40, 128), (90, 60), (64, 200), (100, 100), (70, 50)]


@pytest.mark.parametrize("workers", [0, 2])
def test_ddp_ranks_draw_the_same_bucket_at_every_step(tmp_path, workers):
    urls = _shards(tmp_path, SIZES, n_shards=5, per_shard=13)
    counts = {u: 13 for u in urls}
    spec = BucketSpec(area=4096, step=16)
    shapes, keys = {}, {}
    for rank in range(2):
        ds = ShardDataset(urls, 64, 4, shuffle_buffer=8, rank=rank, world_size=2, num_workers=workers,
                          shard_counts=counts, buckets=spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(EpochLoader(ds, num_workers=workers))
        assert len(batches) == len(ds)
        shapes[rank] = [tuple(b["image"].shape[2:]) for b in batches]
        keys[rank] = {k for b in batches for k in b["key"]}
        assert all(b["image"].shape[0] == 4 for b in batches)
        mine = {f"s{int(u[-9:-4])}_" for u in ds.shards_for(0, 1, rank)}
        assert all(k[:3] in mine or k[:4] in mine for k in keys[rank])  # each rank reads its own shards
    assert shapes[0] == shapes[1]
    assert len(set(shapes[0])) > 1                                      # several buckets are trained
    assert not keys[0] & keys[1]


def test_weights_from_info_sizes_match_a_header_scan(tmp_path):
    urls = _shards(tmp_path, SIZES, n_shards=2, per_shard=14)
    spec = BucketSpec(area=4096, step=16)
    scanned = ShardDataset(urls, 64, 4, rank=0, world_size=1, buckets=spec).bucket_weights
    histogram = Counter(SIZES * 4)
    assert scanned == [float(c) for c in bucket_counts(histogram, spec)]


def _odd_images() -> dict[str, bytes]:
    """Real-world oddities: a 1×4000 strip, 16-bit grey, a CMYK JPEG, a truncated PNG, and a normal image."""
    g = np.random.default_rng(0)
    normal = _encode(Image.fromarray(g.integers(0, 256, (48, 80, 3), dtype=np.uint8)))
    grey16 = Image.fromarray(np.full((64, 64), 300 * 257 // 3, np.uint16))   # 25700 -> 100 in 8 bits
    cmyk = Image.new("CMYK", (64, 96), (0, 255, 255, 0))                     # pure red, Adobe-inverted JPEG
    return {"strip": _encode(Image.new("RGB", (1, 4000), (10, 200, 30))), "grey16": _encode(grey16),
            "cmyk": _encode(cmyk, "JPEG", quality=95), "truncated": normal[:len(normal) // 2], "normal": normal}


@pytest.mark.parametrize("bucketed", [True, False])
def test_odd_real_images_are_converted_or_skipped_with_a_counted_reason(tmp_path, bucketed):
    images = _odd_images()
    url = str(tmp_path / "odd.tar")
    write_shard(url, [(name, encode_sample(data, name, {})) for name, data in images.items()])
    spec = BucketSpec(area=4096, step=16) if bucketed else None
    ds = ShardDataset([url], 64, 8, rank=0, world_size=1, buckets=spec, greedy_buckets=bucketed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(ds)
    reasons = Counter()
    for b in batches:
        reasons.update(b["skip_reasons"])
    by_key = {k: (b["image"][i], b["original_size"][i].tolist()) for b in batches for i, k in enumerate(b["key"])}
    skipped = {"truncated": "corrupt_image", **({"strip": "too_small"} if bucketed else {})}
    assert reasons == Counter(skipped.values()) and set(by_key) == set(images) - set(skipped)
    grey, original = by_key["grey16"]
    assert original == [64, 64] and torch.allclose(grey, torch.full_like(grey, 100 / 127.5 - 1), atol=1e-6)
    red, original = by_key["cmyk"]
    assert original == [96, 64] and red[0].mean() > 0.95 and red[1:].abs().sub(1).abs().max() < 0.1
    if bucketed:
        assert tuple(red.shape[1:]) == (80, 48)                        # portrait bucket 48x80 (w x h)
    else:
        strip, original = by_key["strip"]
        assert original == [4000, 1] and strip.shape == (3, 64, 64)   # stretched, but a valid square crop


def test_webdatamodule_buckets_from_a_config_value(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    _shards(root / "train", SIZES, n_shards=2, per_shard=7)
    _shards(root / "val", SIZES, n_shards=1, per_shard=7)
    dm = WebDataModule(str(root), resolution=64, batch_size=2, num_workers=0, shuffle_buffer=0,
                       buckets={"step": 16, "max_upscale": 3.0})
    assert dm.buckets == BucketSpec(area=64 * 64, step=16, max_upscale=3.0)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(dm.train_dataloader()))
    h, w = batch["image"].shape[2:]
    assert (w, h) in dm.buckets.buckets() and batch["original_size"].shape == batch["crop_coords"].shape == (2, 2)
    with pytest.raises(Exception, match="buckets"):
        WebDataModule(str(root), buckets={"area": 4096, "steps": 16})


def _folder(root, sizes, n):
    root.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"picture number {i}")


def test_folder_buckets_record_sizes_and_the_cache_stores_one_bucket_per_chunk(tmp_path):
    from tiny_parts import tiny_text_encoder, tiny_vae

    from ldm.data.folder import build_folder
    from ldm.data.latents import LatentBucketBatches, LatentDataModule, LatentDataset, build_latent_cache

    _folder(tmp_path / "src", [(80, 40), (40, 80), (64, 64), (100, 30), (10, 10), (33, 47)], 30)
    spec = BucketSpec(area=32 * 32, step=8)
    info = build_folder(tmp_path / "src", tmp_path / "data", size=32, buckets=spec, val_fraction=0.2, processes=1)
    assert info["skipped"] == {"too_small": 5} and info["buckets"]["list"] == [list(b) for b in spec.buckets()]
    stored = sum((Counter(split) for split in info["sizes"].values()), Counter())
    # each kept image downscaled to just cover its bucket: 80x40 -> bucket 40x24 -> 48x24, 100x30 -> 64x16 -> 64x19
    assert set(stored) == {"48x24", "24x48", "32x32", "64x19", "28x40"} and sum(stored.values()) == 25
    vae, text = tiny_vae(), tiny_text_encoder()
    cache = build_latent_cache(vae, text, tmp_path / "data", tmp_path / "cache", 32, buckets=spec, progress=False,
                               batch_size=4, labels={"width": "width"})
    listed = cache["splits"]["train"]
    assert len(set(map(tuple, listed["chunk_sizes"].values()))) == len(listed["chunks"]) >= 3
    train = LatentDataset(tmp_path / "cache", "train")
    assert len(train) == listed["samples"] and len(train.groups) == len(listed["chunks"])
    # round trip: each cached latent is the VAE posterior of the bucketed image the loader makes
    ds = ShardDataset(sorted(str(p) for p in (tmp_path / "data" / "train").glob("*.tar")), 32, 4, rank=0,
                      world_size=1, buckets=spec, greedy_buckets=True)
    where = {c: i for i, c in enumerate(train.captions)}
    f, scale, shift = vae.config.downsample_factor, vae.config.scaling_factor, vae.config.shift_factor
    with torch.no_grad():
        for batch in ds:
            mean = (vae.encode(batch["image"]).mean - shift) * scale
            got = train.__getitems__([where[c] for c in batch["caption"]])
            torch.testing.assert_close(got["latent_mean"], mean, atol=1e-5, rtol=1e-4)
            assert got["latent_mean"].shape[2:] == (batch["image"].shape[2] // f, batch["image"].shape[3] // f)
            assert torch.equal(got["original_size"], batch["original_size"])
            assert torch.equal(got["crop_coords"], batch["crop_coords"])
            # labels travel with their samples through the per-bucket chunks
            widths = [train.label_classes["width"][i] for i in got["labels"][:, 0]]
            assert widths == [str(m["width"]) for m in batch["meta"]]
    with pytest.raises(ValueError, match="one bucket"):
        train.__getitems__([0, len(train) - 1])
    # two ranks: the same bucket at every step, equal lengths, disjoint samples
    plans = [LatentBucketBatches(train, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    runs = [list(p) for p in plans]
    assert len(runs[0]) == len(runs[1]) == len(plans[0]) > 0
    assert [b["latent_mean"].shape for b in runs[0]] == [b["latent_mean"].shape for b in runs[1]]
    assert not {c for b in runs[0] for c in b["caption"]} & {c for b in runs[1] for c in b["caption"]}
    dm = LatentDataModule(str(tmp_path / "cache"), batch_size=2)
    assert sorted(map(tuple, dm.image_sizes)) == sorted({tuple(v) for s in cache["splits"].values()
                                                         for v in s["chunk_sizes"].values()})
    assert len(dm.train_dataloader()) == len(LatentBucketBatches(train, 2, seed=0))
