"""Stream image-caption shards into training batches: ``ShardDataset`` and the ``WebDataModule``.

Batches are dicts::

    {"image": FloatTensor (B, 3, H, W) in [-1, 1], "caption": list[str], "meta": list[dict],
     "key": list[str], "original_size": LongTensor (B, 2), "crop_coords": LongTensor (B, 2),
     "skipped": LongTensor (), "skip_reasons": dict[str, int]}

``original_size`` is each image's (height, width) before resizing (the json's ``original_height``/
``original_width`` when recorded), ``crop_coords`` the (top, left) corner of its crop in the resized image:
SDXL's micro-conditioning inputs (Podell et al. 2023, sec. 2.2).

``skipped`` is the number of bad inputs (corrupt/truncated image, missing caption, bad json, unreadable
shard, ...) the producing worker skipped since its previous batch, so summing it over batches counts every
skip exactly once; ``skip_reasons`` splits that number by reason (keys of ``SKIP_REASONS``, only the
reasons that occurred). From a LightningModule, ``log_skipped(module, batch, split)`` in each step logs the
sum and ``log_skip_reasons(module, split)`` at each epoch end logs the count of every reason that occurred.

Images and captions are decoded by ``ldm.data.images`` (the decoding every reader shares: 16-bit and
palette/CMYK modes, EXIF orientation, transparency composited on ``background``, a ``max_pixels`` limit
checked from the header, strict UTF-8 captions).

Splitting: shards are shuffled with a seed shared by every rank (per epoch), then dealt out by node
(``rank::world_size``) and by DataLoader worker (``worker::num_workers``), so ranks and workers read
disjoint shards and together read every shard once. In *resampled* mode (``samples_per_epoch`` set)
each worker instead draws shards with replacement and yields a fixed number of samples, so every DDP
rank sees the same number of batches and stays in step.

Images are resized (shorter side) and centre-cropped to ``resolution``; a random crop and a horizontal
flip are available but off, and the flip is refused when captions speak of left or right. With ``buckets``
(``ldm.data.buckets``, ``ldm.data.bucketed``) images keep their aspect ratio: each batch holds one bucket of
about ``resolution``² pixels, and every DDP rank draws the same bucket at every step.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import IterableDataset

from ldm.data.buckets import BucketSpec
from ldm.data.images import (
    DECODE_REASONS,
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_caption,
    decode_rgb,
    parse_background,
    resize_crop_coords,
)
from ldm.data.img2dataset import held_out
from ldm.data.resumable import ResumableLoader
from ldm.data.shards import IMAGE_EXTS, Sample, list_shards, read_info, read_shard
from ldm.dist import rank_and_world
from ldm.errors import UsageError

LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ShardDataset deals
# shards out per worker and computes its length from that split, so the warning does not apply.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined", category=UserWarning)
MAX_WARNINGS_PER_WORKER = 20
# every reason a sample or shard is skipped for (the metric names of log_skipped)
SKIP_REASONS: dict[str, str] = {
    "no_image": f"sample without an image file ({'/'.join(IMAGE_EXTS)})",
    "missing_caption": "sample without a caption, or an empty one (require_caption)",
    "bad_json": "sample whose .json is not valid JSON",
    **DECODE_REASONS,
    "too_small": "an image that would need more than buckets.max_upscale enlargement to cover its bucket",
    "unreadable_shard": "a shard, or the rest of it, could not be read",
}


class DataSkipWarning(UserWarning):
    """A sample or shard was skipped (it is counted in the batches' ``skipped`` field)."""


def decode_image(data: bytes, resolution: int, rng: random.Random | None = None,
                 background: tuple[int, int, int] = DEFAULT_BACKGROUND,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a uint8 (resolution, resolution, 3) array: shorter side resized, then cropped.

    Decoding is ``ldm.data.images.decode_rgb``; the crop is centred, or uniformly placed when ``rng`` is
    given (random crop). Raises ``DecodeError`` (with a ``reason``) for unusable bytes.
    """
    return decode_square(data, resolution, rng, background, max_pixels)[0]


def decode_square(data: bytes, resolution: int, rng: random.Random | None = None,
                  background: tuple[int, int, int] = DEFAULT_BACKGROUND, max_pixels: int | None = DEFAULT_MAX_PIXELS
                  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """:func:`decode_image` and the micro-conditioning inputs: (array, (height, width) as decoded, crop (top, left))."""
    image = decode_rgb(data, background, max_pixels, min_side=resolution)
    original = (image.size[1], image.size[0])
    cropped, crop = resize_crop_coords(image, resolution, rng)
    return np.asarray(cropped, dtype=np.uint8), original, crop


def images_to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack uint8 HWC arrays into a float NCHW tensor in [-1, 1] (x / 127.5 - 1).

    Done in numpy: single-threaded and fast, where torch's intra-op threads only add overhead here.
    """
    batch = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    batch *= 1 / 127.5
    batch -= 1.0
    return torch.from_numpy(batch)


def _recorded_original(meta: dict[str, Any], decoded: tuple[int, int]) -> tuple[int, int]:
    """The image's size before any resizing, (height, width): the json's ``original_height``/``original_width``
    (img2dataset and ``ldm data folder`` record them) when present, else the size as decoded."""
    try:
        h, w = int(meta["original_height"]), int(meta["original_width"])
    except (KeyError, TypeError, ValueError):
        return decoded
    return (h, w) if h > 0 and w > 0 else decoded


def mentions_left_right(caption: str) -> bool:
    """Whether flipping the image would make ``caption`` wrong."""
    return LEFT_RIGHT.search(caption) is not None


def _identity(batch: Any) -> Any:
    return batch


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardDataset(IterableDataset):
    """Batches decoded from tar shards, split by node and worker (see the module docstring).

    ``rank``/``world_size`` default to torch.distributed's (0/1 without a process group). ``epoch`` is
    set by ``EpochLoader`` before every pass so shard order and shuffling change between epochs.
    """

    def __init__(self, urls: list[str], resolution: int, batch_size: int, shuffle_buffer: int = 0,
                 samples_per_epoch: int | None = None, random_crop: bool = False, hflip: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, require_caption: bool = True,
                 shard_counts: dict[str, int] | None = None,
                 background: tuple[int, int, int] = DEFAULT_BACKGROUND,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, buckets: BucketSpec | None = None,
                 bucket_weights: list[float] | None = None, greedy_buckets: bool = False,
                 holdout: tuple[float, int, bool] | None = None) -> None:
        super().__init__()
        if not urls:
            raise ValueError("ShardDataset needs at least one shard")
        if batch_size < 1 or resolution < 1:
            raise ValueError(f"batch_size and resolution must be >= 1, got {batch_size} and {resolution}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        dist_rank, dist_world = rank_and_world()
        self.urls = list(urls)
        self.resolution, self.batch_size, self.shuffle_buffer = resolution, batch_size, shuffle_buffer
        self.samples_per_epoch, self.random_crop, self.hflip = samples_per_epoch, random_crop, hflip
        self.seed, self.require_caption = seed, require_caption
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        self.num_workers = num_workers  # only used by __len__; iteration asks torch for the real count
        self.shard_counts = shard_counts
        self.background, self.max_pixels = parse_background(background), max_pixels
        self.epoch = 0
        self._pending: dict[str, int] = {}
        self._warned = 0
        # aspect-ratio buckets (ldm.data.bucketed): per-bucket sample weights for the shared step schedule
        self.buckets, self.greedy_buckets = buckets, greedy_buckets
        self.holdout = holdout  # (fraction, seed, keep the held-out keys?): a carved validation set
        self.bucket_weights = bucket_weights
        if buckets is not None and bucket_weights is None:
            from ldm.data.bucketed import scan_bucket_counts

            self.bucket_weights = scan_bucket_counts(self.urls, buckets)

    # ---- splitting ---------------------------------------------------------------------------------
    @property
    def strided(self) -> bool:
        """Fewer shards than ranks (a carved validation set, a one-shard dataset): every rank reads every shard
        and keeps every ``world_size``-th sample of it, from its rank on, instead of ranks splitting shards."""
        return self.samples_per_epoch is None and 1 < self.world_size and len(self.urls) < self.world_size

    def shards_for(self, worker: int, num_workers: int, rank: int | None = None) -> list[str]:
        """This (or ``rank``'s) worker's shards for a non-resampled pass (shuffled per epoch if shuffling)."""
        order = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)  # same on every rank
        rank = self.rank if rank is None else rank
        return (order if self.strided else order[rank::self.world_size])[worker::num_workers]

    def samples_per_worker(self, num_workers: int) -> int:
        """Resampled mode: samples each worker yields per epoch (``samples_per_epoch`` split evenly)."""
        per_rank = math.ceil(self.samples_per_epoch / self.world_size)
        return math.ceil(per_rank / max(1, num_workers))

    def __len__(self) -> int:
        """Batches per epoch on this rank: exact in resampled mode, from info.json shard counts otherwise.

        In a one-pass epoch under DDP it is the longest rank's count: ``EpochLoader`` pads the other ranks
        to it, so every rank runs the same number of steps.
        """
        workers = max(1, self.num_workers)
        if self.samples_per_epoch is not None:
            return workers * math.ceil(self.samples_per_worker(workers) / self.batch_size)
        if self.shard_counts is None or any(u not in self.shard_counts for u in self.urls):
            raise TypeError("length unknown: no per-shard counts (set samples_per_epoch for a fixed length)")
        def samples(w: int, r: int) -> int:
            n = sum(self.shard_counts[u] for u in self.shards_for(w, workers, r))
            return max(0, math.ceil((n - r) / self.world_size)) if self.strided else n

        return max(sum(math.ceil(samples(w, r) / self.batch_size) for w in range(workers))
                   for r in range(self.world_size))

    # ---- reading -----------------------------------------------------------------------------------
    def _skip(self, reason: str, what: str) -> None:
        if getattr(self, "_repeating", False):
            return  # a sample read again to keep ranks in step was counted on its first read
        self._pending[reason] = self._pending.get(reason, 0) + 1
        if self._warned < MAX_WARNINGS_PER_WORKER:
            self._warned += 1
            suffix = " (further skips are counted without warning)" if self._warned == MAX_WARNINGS_PER_WORKER else ""
            warnings.warn(f"skipped {what}{suffix}", DataSkipWarning, stacklevel=2)

    def _shard_stream(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[str]:
        if self.samples_per_epoch is None:
            yield from self.shards_for(worker, num_workers)
            return
        while True:
            yield rng.choice(self.urls)

    def _raw_samples(self, shards: Iterator[str]) -> Iterator[Sample]:
        failures_in_a_row, position, stride = 0, 0, self.world_size if self.strided else 1
        for url in shards:
            try:
                for sample in read_shard(url):
                    failures_in_a_row = 0
                    if self.holdout is not None and held_out(sample[0], *self.holdout[:2]) != self.holdout[2]:
                        continue
                    position += 1
                    if stride > 1 and (position - 1) % stride != self.rank:
                        continue
                    yield sample
            except Exception as e:  # noqa: BLE001 - unreadable/truncated shard: skip, warn, count
                self._skip("unreadable_shard", f"the rest of shard {url}: {type(e).__name__}: {e}")
                failures_in_a_row += 1
                if failures_in_a_row > 2 * len(self.urls) + 8:
                    raise RuntimeError(f"{failures_in_a_row} shards in a row were unreadable "
                                       f"(last: {url}); check the dataset at --data.data_dir") from e

    def _shuffled(self, samples: Iterator[Sample], rng: random.Random) -> Iterator[Sample]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[Sample] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def decode(self, key: str, files: dict[str, bytes], rng: random.Random) -> tuple[np.ndarray, str, dict]:
        """One sample's (uint8 HWC image, caption, metadata); raises ``DecodeError`` when it is unusable."""
        return self.decode_sample(key, files, rng)[:3]

    def decode_sample(self, key: str, files: dict[str, bytes], rng: random.Random, bucket: tuple[int, int] | None = None
                      ) -> tuple[np.ndarray, str, dict, tuple[int, int], tuple[int, int]]:
        """(image, caption, metadata, original (height, width), crop (top, left)) of one sample, the image cut to
        ``bucket`` (width, height) or to the square ``resolution``; raises ``DecodeError`` when it is unusable."""
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            raise DecodeError("no_image", f"sample {key} has no image ({'/'.join(IMAGE_EXTS)}); files: {sorted(files)}")
        text = files.get("txt")
        try:
            caption = "" if text is None else decode_caption(text)
        except DecodeError as e:
            raise DecodeError(e.reason, f"sample {key}: {e}") from e
        if self.require_caption and not caption:
            raise DecodeError("missing_caption",
                              f"sample {key} has {'an empty' if text is not None else 'no'} caption (.txt)")
        meta: dict[str, Any] = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DecodeError("bad_json", f"sample {key} has invalid json: {e}") from e
        crop_rng = rng if self.random_crop else None
        try:
            if bucket is None:
                image, original, crop = decode_square(files[ext], self.resolution, crop_rng, self.background,
                                                      self.max_pixels)
            else:
                from ldm.data.bucketed import decode_bucket

                image, original, crop = decode_bucket(files[ext], bucket, crop_rng, self.background, self.max_pixels)
        except DecodeError as e:
            raise DecodeError(e.reason, f"sample {key}: .{ext} {e}") from e
        if self.hflip and not mentions_left_right(caption) and rng.random() < 0.5:
            image = image[:, ::-1]  # crop coordinates stay those of the unflipped image
        original = _recorded_original(meta, original)
        return image, caption, meta, original, crop

    def _batch(self, items: list[tuple]) -> dict[str, Any]:
        reasons, self._pending = self._pending, {}
        return {"image": images_to_tensor([it[1] for it in items]), "caption": [it[2] for it in items],
                "meta": [it[3] for it in items], "key": [it[0] for it in items],
                "original_size": torch.tensor([it[4] for it in items], dtype=torch.long).view(-1, 2),
                "crop_coords": torch.tensor([it[5] for it in items], dtype=torch.long).view(-1, 2),
                "skipped": torch.tensor(sum(reasons.values()), dtype=torch.long), "skip_reasons": reasons}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        self._pending, self._warned = {}, 0
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        if self.buckets is not None:
            from ldm.data.bucketed import bucketed_batches

            yield from bucketed_batches(self, rng, worker, num_workers)
            return
        limit = self.samples_per_worker(num_workers) if self.samples_per_epoch is not None else None
        samples = self._shuffled(self._raw_samples(self._shard_stream(rng, worker, num_workers)), rng)
        items: list[tuple] = []
        produced = 0
        for key, files in samples:
            if limit is not None and produced >= limit:
                break
            try:
                decoded = self.decode_sample(key, files, rng)
            except DecodeError as e:
                self._skip(e.reason, str(e))
                continue
            items.append((key, *decoded))
            produced += 1
            if len(items) == self.batch_size:
                yield self._batch(items)
                items = []
        if items:
            yield self._batch(items)


class EpochLoader(ResumableLoader):
    """A DataLoader that tells its ``ShardDataset`` which pass this is, so every epoch reshuffles.

    Workers are (re)started at each ``iter()`` (no persistent workers), so they see the new epoch. The pass
    and the batches already trained are saved in Lightning checkpoints (``ResumableLoader``), so a resumed
    run continues the same stream.
    """

    def __init__(self, dataset: ShardDataset, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", None)
        kwargs.setdefault("collate_fn", _identity)
        super().__init__(dataset, **kwargs)

    def _source(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset
        if dataset.world_size == 1 or dataset.samples_per_epoch is not None:
            return super()._source()
        try:
            target = len(dataset)
        except TypeError:  # no shard counts: ranks may run different step counts (WebDataModule warns)
            return super()._source()
        return self._padded(target)

    def _padded(self, target: int) -> Iterator[dict[str, Any]]:
        """Exactly ``target`` batches under DDP: a rank whose pass is shorter (fewer samples in its shards,
        skipped samples, a vanished shard) starts its own shards again, so no rank waits for the others
        forever. Repeated batches carry ``skipped = 0`` and no ``skip_reasons``: skips are counted once."""
        produced, repeating = 0, False
        while produced < target:
            fresh = 0
            for batch in super()._source():
                if repeating:
                    batch["skipped"] = torch.zeros_like(batch["skipped"])
                    batch["skip_reasons"] = {}
                yield batch
                produced, fresh = produced + 1, fresh + 1
                if produced == target:
                    return
            if fresh == 0:
                raise RuntimeError(f"rank {self.dataset.rank} read no usable sample from its shards; it cannot keep "
                                   "step with the other ranks. Check the dataset at --data.data_dir")
            repeating = True


def skipped_count(batch: dict[str, Any]) -> int:
    """Bad inputs skipped by the batch's worker since its previous batch (0 if the batch has no count)."""
    value = batch.get("skipped", 0)
    return int(value.item() if isinstance(value, torch.Tensor) else value)


_REASON_COUNTS: "weakref.WeakKeyDictionary[pl.LightningModule, dict[str, dict[str, int]]]" = weakref.WeakKeyDictionary()


def log_skipped(module: pl.LightningModule, batch: dict[str, Any], split: str = "train") -> int:
    """Log ``{split}/skipped_samples`` (the epoch's skipped inputs, summed over batches and DDP ranks) and
    add the batch's ``skip_reasons`` to the module's per-reason counts for ``log_skip_reasons``.

    Call it from ``training_step``/``validation_step``; returns the batch's total. The reasons are logged once
    per epoch, not per step: every ``self.log`` call costs about a millisecond, ten of them per step would
    slow small models noticeably.
    """
    n = skipped_count(batch)
    module.log(f"{split}/skipped_samples", float(n), on_step=False, on_epoch=True, reduce_fx="sum",
               sync_dist=True, batch_size=1)
    reasons = batch.get("skip_reasons")
    if reasons:
        counts = _REASON_COUNTS.setdefault(module, {}).setdefault(split, {})
        for reason, k in reasons.items():
            counts[reason] = counts.get(reason, 0) + int(k)
    return n


def log_skip_reasons(module: pl.LightningModule, split: str = "train") -> dict[str, int]:
    """Log ``{split}/skipped/{reason}`` for each reason of ``SKIP_REASONS`` that occurred since the last call
    (summed over DDP ranks with one all-reduce), then start counting afresh; returns the logged counts.

    Call it from ``on_train_epoch_end`` / ``on_validation_epoch_end`` on every rank (the all-reduce needs all).
    """
    counts = _REASON_COUNTS.get(module, {}).pop(split, {})
    local = torch.tensor([float(counts.get(r, 0)) for r in SKIP_REASONS], device=module.device)
    trainer = getattr(module, "_trainer", None)
    total = trainer.strategy.reduce(local, reduce_op="sum") if trainer is not None else local
    logged = {r: int(v) for r, v in zip(SKIP_REASONS, total.tolist()) if v}
    for reason, value in logged.items():  # the same reduced values on every rank: no further sync
        module.log(f"{split}/skipped/{reason}", float(value), on_step=False, on_epoch=True, batch_size=1)
    return logged


class WebDataModule(pl.LightningDataModule):
    """Image-caption shards (``data_dir/train/*.tar``, ``data_dir/val/*.tar``) as Lightning dataloaders.

    Args:
        data_dir: dataset folder, a single .tar, or a glob/brace pattern of shards (then used for training).
        resolution: output side; images are resized on the shorter side and centre-cropped.
        batch_size: training batch size (``val_batch_size`` defaults to it).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples held for shuffling (training only; shard order is shuffled too).
        samples_per_epoch: resampled mode: draw shards with replacement and yield this many samples per
            epoch over all ranks (use it under DDP so ranks stay in step). ``None``: one pass over the shards.
        train_split / val_split: sub-folder names; ``val_split=None`` disables validation.
        random_crop: crop at a random offset instead of the centre (only matters for non-square images).
        hflip: random horizontal flips; refused (with a warning) when the captions mention left/right.
        seed: seeds shard order, the shuffle buffer, crops and flips (with epoch, rank and worker).
        require_caption: skip (and count) samples without a caption.
        background: colour transparent images are composited on (a name, ``#rrggbb`` or [r, g, b]); the
            folder builder's default is the same white.
        max_pixels: images with more pixels (read from the header, after JPEG draft downscaling) are
            skipped as ``too_many_pixels`` without being decoded; ``None``: no limit.
        buckets: aspect-ratio buckets instead of square crops (``ldm.data.buckets``): ``true`` for buckets of area
            ``resolution``² in 32-px steps, or ``{area, step, max_aspect, max_upscale}``. Each batch holds one bucket;
            every DDP rank draws the same bucket at every step (counts from info.json's ``sizes``, else from the
            image headers of the first shards). ``random_crop`` picks where each bucket's crop falls.
        val_fraction: a folder of shards without ``train/``/``val/`` (an img2dataset download) gets its validation
            set carved out of it: this fraction of its shards (of its samples when it has one shard), chosen by a
            seeded hash (``ldm.data.img2dataset``), printed and recorded in checkpoints.
    """

    def __init__(self, data_dir: str, resolution: int = 32, batch_size: int = 64,
                 num_workers: int = 2, shuffle_buffer: int = 2000, samples_per_epoch: int | None = None,
                 train_split: str = "train", val_split: str | None = "val", val_batch_size: int | None = None,
                 random_crop: bool = False, hflip: bool = False, seed: int = 0, require_caption: bool = True,
                 pin_memory: bool = False, background: str | list[int] = "white",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, buckets: bool | dict[str, Any] | None = None,
                 val_fraction: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir, self.resolution, self.batch_size = data_dir, resolution, batch_size
        self.num_workers, self.shuffle_buffer, self.samples_per_epoch = num_workers, shuffle_buffer, samples_per_epoch
        self.train_split, self.val_split = train_split, val_split
        self.val_batch_size = val_batch_size or batch_size
        self.random_crop, self.hflip, self.seed = random_crop, hflip, seed
        self.require_caption, self.pin_memory = require_caption, pin_memory
        try:
            self.background = parse_background(background)
        except ValueError as e:
            raise UsageError(f"--data.background: {e}") from None
        if max_pixels is not None and max_pixels < 1:
            raise UsageError(f"--data.max_pixels must be >= 1 (or null for no limit), got {max_pixels}")
        self.max_pixels = max_pixels
        try:
            self.buckets = BucketSpec.from_config(buckets, resolution)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--data.buckets: {e}") from None
        self._buckets_as_recorded = buckets is True  # setup() takes the step/aspect `ldm data folder` recorded
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"--data.val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.info: dict[str, Any] = {}
        self.holdout: dict[str, Any] | None = None  # how a flat folder's validation set was carved

    @property
    def benchmark(self):
        """The evaluation hooks of this dataset's module (``ldm.data.registry``, by info.json's name), or None."""
        from ldm.data.registry import benchmark_named

        try:
            name = read_info(self.data_dir).get("name")
        except (OSError, ValueError):
            name = None
        return benchmark_named(name)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return rank_and_world()

    def _counts(self, split: str) -> dict[str, int] | None:
        """Samples per shard of ``split`` (info.json, img2dataset's stats, or the tar headers; None if unknown)."""
        from ldm.data.img2dataset import shard_counts

        train = split == self.train_split
        urls = self.train_urls if train else self.val_urls
        counts, _ = shard_counts(urls, self.info, split)
        if not counts:
            return None
        if self.holdout is not None and self.holdout["kind"] == "samples":  # expected share; ranks are padded
            f = self.holdout["fraction"]
            counts = {u: (c - round(c * f)) if train else round(c * f) for u, c in counts.items()}
        return counts

    def _holdout_spec(self, train: bool) -> tuple[float, int, bool] | None:
        if self.holdout is None or self.holdout["kind"] != "samples":
            return None
        return self.holdout["fraction"], self.holdout["seed"], not train

    def setup(self, stage: str | None = None) -> None:
        """Find the shards (a clear error if there are none), carve a validation set out of a flat folder, and
        check the flip against the captions."""
        from ldm.data.img2dataset import carve_validation, is_flat_folder

        try:
            self.info = read_info(self.data_dir)
        except (OSError, ValueError):
            self.info = {}
        recorded = self.info.get("buckets")
        if self._buckets_as_recorded and isinstance(recorded, dict):
            self.buckets = BucketSpec.from_config({k: recorded[k] for k in ("step", "max_aspect", "max_upscale")
                                                   if k in recorded}, self.resolution)
        self.train_urls = list_shards(self.data_dir, self.train_split)
        if self.val_split and is_flat_folder(self.data_dir, self.train_split) and not (
                Path(self.data_dir) / self.val_split).is_dir():
            self.train_urls, self.val_urls, self.holdout = carve_validation(self.train_urls, self.val_fraction,
                                                                            self.seed)
            if rank_and_world()[0] == 0 and not getattr(self, "_announced", False):
                self._announced = True
                held = (f"{len(self.val_urls)} of {len(self.train_urls) + len(self.val_urls)} shards"
                        if self.holdout["kind"] == "shards" else f"{self.val_fraction:.0%} of the samples by key")
                print(f"{self.data_dir} has no {self.val_split}/ folder: validating on {held} "
                      f"(val_fraction {self.val_fraction}, seed {self.seed}; recorded in checkpoints)", flush=True)
        else:
            self.val_urls = list_shards(self.data_dir, self.val_split) if self.val_split else []
        if self.hflip and self._captions_mention_left_right():
            warnings.warn("hflip=True refused: captions mention left/right, so a flipped image would contradict "
                          "its caption; training without horizontal flips", UserWarning, stacklevel=2)
            self.hflip = False

    def _captions_mention_left_right(self, limit: int = 500) -> bool:
        seen = 0
        for url in self.train_urls[:3]:
            try:
                for _, files in read_shard(url):
                    if mentions_left_right(files.get("txt", b"").decode("utf-8", errors="replace")):
                        return True
                    seen += 1
                    if seen >= limit:
                        return False
            except Exception:  # noqa: BLE001 - an unreadable shard is reported when it is streamed
                continue
        return False

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: how the validation set of a flat folder was carved (empty otherwise)."""
        return {"holdout": self.holdout} if self.holdout is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recorded = state_dict.get("holdout")
        if recorded and self.holdout is not None and recorded != self.holdout:
            warnings.warn(f"the checkpoint's validation set of {self.data_dir} was carved as {recorded}, this run "
                          f"carves {self.holdout} (the folder or val_fraction/seed changed)", UserWarning, stacklevel=2)

    def _bucket_weights(self, split: str, urls: list[str]) -> list[float] | None:
        """Samples per bucket from info.json's ``sizes`` histogram (None: the dataset scans image headers)."""
        from ldm.data.buckets import bucket_counts, parse_size_key

        sizes = (self.info.get("sizes") or {}).get(split)
        if not sizes or self.buckets is None:
            return None
        counts = bucket_counts({parse_size_key(k): int(v) for k, v in sizes.items()}, self.buckets)
        return [float(c) for c in counts] if sum(counts) else None

    def _dataset(self, urls: list[str], split: str, train: bool) -> ShardDataset:
        rank, world = self._rank_world()
        counts = self._counts(split)
        if train and world > 1 and self.samples_per_epoch is None and (counts is None or len(counts) < len(urls)):
            warnings.warn(f"training on {world} ranks without samples_per_epoch or per-shard counts (info.json, "
                          "img2dataset's *_stats.json, or readable local tar files): "
                          "ranks may see different numbers of batches (DDP then waits forever at the epoch end); "
                          "set --data.samples_per_epoch for resampled, equal-length epochs", UserWarning, stacklevel=2)
        return ShardDataset(urls, self.resolution, self.batch_size if train else self.val_batch_size,
                            shuffle_buffer=self.shuffle_buffer if train else 0,
                            samples_per_epoch=self.samples_per_epoch if train else None,
                            random_crop=self.random_crop and train, hflip=self.hflip and train, seed=self.seed,
                            rank=rank, world_size=world, num_workers=self.num_workers,
                            require_caption=self.require_caption, shard_counts=counts,
                            background=self.background, max_pixels=self.max_pixels, buckets=self.buckets,
                            bucket_weights=self._bucket_weights(split, urls), holdout=self._holdout_spec(train))

    def _loader(self, dataset: ShardDataset) -> EpochLoader:
        return EpochLoader(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def _ensure_setup(self) -> None:
        if not self.train_urls:
            self.setup("fit")

    def train_dataloader(self) -> EpochLoader:
        self._ensure_setup()
        return self._loader(self._dataset(self.train_urls, self.train_split, train=True))

    def val_dataloader(self) -> EpochLoader | list:
        self._ensure_setup()
        if not self.val_urls:
            return []
        return self._loader(self._dataset(self.val_urls, self.val_split, train=False))
