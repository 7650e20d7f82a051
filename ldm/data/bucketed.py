"""Bucketed batches from tar shards: the ``ShardDataset`` iteration when ``buckets`` is set (``ldm.data.buckets``).

Every sample's size is read from its image header (nothing is decoded yet), the sample is queued in its
bucket (or skipped as ``too_small``), and batches are cut from the queues:

* **Schedule mode** (training): step *i* of the epoch draws from bucket ``bucket_schedule(...)[i]``, a list
  computed from the buckets' sample counts and (seed, epoch) alone, hence the *same on every DDP rank*.
  DataLoader workers hand out batches round-robin, so worker *w* makes steps *w*, *w* + W, … A rank makes
  exactly ``len(dataset)`` batches: when its shards run out it reads them again (those repeats count no
  skips, as ``EpochLoader`` padding does), and a bucket its shards never fill borrows the queued samples of
  the nearest aspect ratio (cropped to the scheduled bucket; also once 64 batches are queued while looking for
  one), so no rank waits for another at an epoch's end and memory stays bounded.
  Samples still queued when the epoch's steps are done are left for the next epoch's reshuffle.
* **Greedy mode** (``greedy_buckets``, the latent cache): each sample exactly once; a batch as soon as a
  bucket has ``batch_size`` samples, the partial batches at the end.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ldm.data.buckets import (
    BucketSpec,
    Size,
    assign_bucket,
    bucket_counts,
    bucket_schedule,
    cover_scale,
    resize_to_bucket,
)
from ldm.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, DecodeError, decode_rgb, open_image, orientation
from ldm.data.shards import IMAGE_EXTS, read_shard

if TYPE_CHECKING:
    from ldm.data.webdata import ShardDataset

SCAN_LIMIT = 2000
QUEUE_BATCHES = 64  # samples queued over all buckets, in batches, before a rare bucket borrows its samples
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def header_size(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Size:
    """(width, height) of the upright image, from its header alone; raises ``DecodeError`` like decoding would."""
    image = open_image(data, max_pixels)
    w, h = image.size
    return (h, w) if orientation(image) in _TRANSPOSED else (w, h)


def _image_bytes(files: dict[str, bytes]) -> bytes | None:
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    return None if ext is None else files[ext]


def decode_bucket(data: bytes, bucket: Size, rng: random.Random | None = None,
                  background: tuple[int, int, int] = DEFAULT_BACKGROUND, max_pixels: int | None = DEFAULT_MAX_PIXELS
                  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Image bytes → (uint8 (h_b, w_b, 3) array covering ``bucket`` (width, height), original (height, width),
    crop (top, left)); decoding is ``ldm.data.images.decode_rgb``."""
    w, h = header_size(data, max_pixels)
    image = decode_rgb(data, background, max_pixels, min_side=max(bucket))
    out, crop = resize_to_bucket(image, bucket, rng)
    return np.asarray(out, dtype=np.uint8), (h, w), crop


def scan_bucket_counts(urls: Sequence[str], spec: BucketSpec, limit: int = SCAN_LIMIT) -> list[float]:
    """Samples per bucket among the first ``limit`` samples of ``urls`` (in list order: the same on every rank),
    from image headers; every bucket gets at least a tiny weight only if nothing could be read."""
    sizes: dict[Size, int] = {}
    seen = 0
    for url in urls:
        try:
            for _, files in read_shard(url):
                data = _image_bytes(files)
                try:
                    size = header_size(data) if data is not None else None
                except DecodeError:
                    size = None
                if size is not None:
                    sizes[size] = sizes.get(size, 0) + 1
                seen += 1
                if seen >= limit:
                    break
        except Exception:  # noqa: BLE001 - unreadable shard: skipped (and counted) when it is streamed
            continue
        if seen >= limit:
            break
    counts = bucket_counts(sizes, spec)
    return [float(c) for c in counts] if sum(counts) else [1.0] * len(counts)


class _Queues:
    """Per-bucket queues of (key, files, size) fed from a restartable sample stream."""

    def __init__(self, ds: ShardDataset, rng: random.Random, worker: int, num_workers: int, restartable: bool):
        self.ds, self.rng, self.worker, self.num_workers, self.restartable = ds, rng, worker, num_workers, restartable
        self.buckets = ds.buckets.buckets()
        self.queues: list[deque] = [deque() for _ in self.buckets]
        self.passes = 0
        self.max_queued = QUEUE_BATCHES * ds.batch_size  # searching further for a rare bucket: borrow instead
        self._open()

    def _open(self) -> None:
        ds = self.ds
        self.passes += 1
        self.fresh_in_pass = 0
        self.it = ds._shuffled(ds._raw_samples(ds._shard_stream(self.rng, self.worker, self.num_workers)), self.rng)

    def pull(self) -> bool:
        """Queue the next usable sample of the stream; False when the stream (this pass) is exhausted."""
        ds = self.ds
        for key, files in self.it:
            data = _image_bytes(files)
            try:
                if data is None:
                    raise DecodeError("no_image", f"sample {key} has no image ({'/'.join(IMAGE_EXTS)})")
                size = header_size(data, ds.max_pixels)
            except DecodeError as e:
                ds._skip(e.reason, f"sample {key}: {e}")
                continue
            b = assign_bucket(size, self.buckets)
            if cover_scale(size, self.buckets[b]) > ds.buckets.max_upscale:
                ds._skip("too_small", f"sample {key}: {size[0]}x{size[1]} would need "
                                      f"{cover_scale(size, self.buckets[b]):.1f}x enlargement to cover its bucket "
                                      f"{self.buckets[b][0]}x{self.buckets[b][1]} (max_upscale "
                                      f"{ds.buckets.max_upscale})")
                continue
            self.queues[b].append((key, files))
            self.fresh_in_pass += 1
            return True
        return False

    def restart(self) -> bool:
        """Read this worker's shards again (their skips are not counted twice); False when not allowed or when the
        pass that ended queued nothing (the shards hold no usable sample)."""
        if not self.restartable or self.fresh_in_pass == 0:
            return False
        self.ds._repeating = True
        self._open()
        return True

    def nearest_nonempty(self, b: int) -> int | None:
        target = math.log(self.buckets[b][0] / self.buckets[b][1])
        full = [i for i, q in enumerate(self.queues) if q]
        if not full:
            return None
        return min(full, key=lambda i: abs(math.log(self.buckets[i][0] / self.buckets[i][1]) - target))

    def take(self, b: int) -> tuple[str, dict[str, bytes]] | None:
        """The next sample for bucket ``b``: queued, streamed, re-streamed (one more whole pass at most), else
        borrowed from the nearest aspect ratio; None when no sample is left anywhere."""
        restarted = False
        while not self.queues[b]:
            if sum(map(len, self.queues)) >= self.max_queued:
                break
            if self.pull():
                continue
            if not restarted and self.restart():
                restarted = True
                continue
            break
        if self.queues[b]:
            return self.queues[b].popleft()
        donor = self.nearest_nonempty(b)
        return None if donor is None else self.queues[donor].popleft()


def _steps(ds: ShardDataset) -> int | None:
    """Batches this rank makes in the epoch (None: unknown, one pass over the shards)."""
    try:
        return len(ds)
    except TypeError:
        return None


def bucketed_batches(ds: ShardDataset, rng: random.Random, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """The batches of one worker (see the module docstring)."""
    ds._repeating = False
    buckets = ds.buckets.buckets()
    if ds.greedy_buckets:
        yield from _greedy(ds, rng, worker, num_workers, buckets)
        return
    steps = _steps(ds)
    weights = ds.bucket_weights
    queues = _Queues(ds, rng, worker, max(1, num_workers), restartable=steps is not None)
    block = steps if steps is not None else 1024
    schedule: list[int] = []
    workers = max(1, num_workers)
    i = worker
    while steps is None or i < steps:
        while i >= len(schedule):  # unknown length: further blocks, each shuffled by (seed, epoch, block)
            schedule += bucket_schedule(weights, block, ds.seed, ds.epoch * 1_000_003 + len(schedule) // block)
        b = schedule[i]
        items: list[tuple] = []
        while len(items) < ds.batch_size:
            sample = queues.take(b)
            if sample is None:
                if steps is None:
                    return  # one pass without counts: this worker is done (WebDataModule warns under DDP)
                raise RuntimeError(f"rank {ds.rank} read no usable sample from its shards; it cannot keep step with "
                                   "the other ranks. Check the dataset at --data.data_dir")
            key, files = sample
            try:
                items.append((key, *ds.decode_sample(key, files, rng, buckets[b])))
            except DecodeError as e:
                ds._skip(e.reason, str(e))
        yield ds._batch(items)
        i += workers


def _greedy(ds: ShardDataset, rng: random.Random, worker: int, num_workers: int, buckets: list[Size]
            ) -> Iterator[dict[str, Any]]:
    queues = _Queues(ds, rng, worker, max(1, num_workers), restartable=False)

    def cut(b: int, n: int) -> Iterator[dict[str, Any]]:
        items: list[tuple] = []
        while queues.queues[b] and len(items) < n:
            key, files = queues.queues[b].popleft()
            try:
                items.append((key, *ds.decode_sample(key, files, rng, buckets[b])))
            except DecodeError as e:
                ds._skip(e.reason, str(e))
        if items:
            yield ds._batch(items)

    while queues.pull():
        for b, q in enumerate(queues.queues):
            if len(q) >= ds.batch_size:
                yield from cut(b, ds.batch_size)
    for b in range(len(buckets)):
        while queues.queues[b]:
            yield from cut(b, ds.batch_size)
