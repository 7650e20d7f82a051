"""Latent cache: VAE latents + the text conditioning, computed once so denoiser training skips both encoders.

Layout written by ``ldm cache`` (``build_latent_cache``)::

    OUT/info.json                       samples and chunk list per split, the parts' weight hashes, data source
    OUT/empty.safetensors               the "" prompt's conditioning (context, mask, pooled) for CFG dropout
    OUT/{train,val}/chunk-NNNNN.safetensors
        mean, std   (N, C, h, w) float32 — the posterior q(z|x) in diffusion space: (μ − shift)·scale, σ·scale
        context     (N, L, D) float16   — token embeddings, L trimmed to the longest caption (exact under masking)
        pooled      (N, E) float16      — the pooled text embedding
        mask        (N, L) uint8        — 1 on real tokens
        original_size, crop_coords (N, 2) int32 — (height, width) before resizing, (top, left) of the crop
      metadata "captions": JSON list of the N captions
      metadata "labels":   JSON list of N objects {label: value or null} (only when labels were asked for)

Labels: ``build_latent_cache(..., labels={"color": "objects.only.color"})`` also stores, per sample, the value
at each path of its json metadata (:func:`label_at`); info.json lists each label's path and its classes (the
values seen, sorted), and batches carry ``labels`` (B, A) class indices, −1 where the json has no value.
A dataset may name default labels (``Benchmark.label_paths``; shapes: the attributes of one-object scenes).

With aspect-ratio buckets (``ldm cache --buckets``, ``ldm.data.buckets``) every chunk holds one bucket, its
image (height, width) listed in info.json's ``chunk_sizes``; :class:`LatentDataModule` then cuts every batch
from one bucket and draws the buckets in the same order on every DDP rank (:class:`LatentBucketBatches`).

Training samples z = mean + std·ε each step, exactly ``vae.encode_latents(x, sample=True)``.

Provenance: a cache is only valid for the VAE and text encoder that wrote it. ``info.json`` records the
sha256 of both parts' weights, the sample count and the chunk files; :class:`LatentDataModule` reads exactly
those chunks and checks the counts, and ``LatentDiffusion`` refuses a cache written by other parts. A new
cache is written into a fresh folder beside ``OUT`` and swapped in whole, so a cache never mixes two runs.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.conditioning import Conditioning
from ldm.data.buckets import BucketSpec, bucket_schedule
from ldm.data.resumable import ResumableLoader
from ldm.data.shards import list_shards, read_info
from ldm.data.webdata import ShardDataset
from ldm.data.workers import ShieldedLoader
from ldm.io import PartError, read_json, weights_hash, write_json

CHUNK = "chunk-{:05d}.safetensors"
EMPTY = "empty.safetensors"
CACHE_FORMAT = 2


class CacheError(PartError):
    """A latent cache is missing, incomplete, or was written by other parts than the ones configured."""


@torch.no_grad()
def label_at(meta: Any, path: str) -> str | None:
    """The value at a dotted ``path`` of a sample's json metadata, as a string (None where there is none).

    Each part is a key of an object or an index of a list; ``only`` picks the element of a one-element list
    (None for any other length): ``objects.only.color`` is the colour of a one-object shapes scene, while
    ``objects.0.color`` is the first object's colour in any scene. Objects and lists are not values (None)."""
    node = meta
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list):
            if part == "only":
                node = node[0] if len(node) == 1 else None
            elif re.fullmatch(r"-?\d+", part) and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
        else:
            return None
        if node is None:
            return None
    return None if isinstance(node, (dict, list)) else str(node)


def parse_label_paths(text: str) -> dict[str, str]:
    """``"color=objects.only.color,shape=objects.only.shape"`` -> ``{"color": ..., "shape": ...}`` (``ldm cache
    --labels``); "" or "none" gives {}. A malformed item is a ``ValueError`` naming it."""
    if text.strip().lower() in ("", "none"):
        return {}
    out = {}
    for item in text.split(","):
        name, sep, path = item.strip().partition("=")
        if not sep or not re.fullmatch(r"\w+", name.strip()) or not path.strip():
            raise ValueError(f"label {item.strip()!r} is not NAME=PATH (e.g. color=objects.only.color)")
        out[name.strip()] = path.strip()
    return out


def encode_split(vae: torch.nn.Module, text_encoder: torch.nn.Module, data_dir: str | Path, split: str,
                 out_dir: Path, resolution: int, batch_size: int = 256, chunk_size: int = 8192,
                 progress: bool = True, num_workers: int = 1, max_samples: int | None = None,
                 buckets: BucketSpec | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Encode every sample of ``data_dir/split`` (or its first ``max_samples``) in shard order into chunk
    files (one bucket per chunk with ``buckets``); returns counts and the chunk names (and, with ``labels``, the
    values seen under ``label_values``).

    Each distinct caption goes through the text encoder once (shapes: 20 k distinct of 50 k)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all), got {max_samples}")
    dataset = ShardDataset(list_shards(data_dir, split), resolution, batch_size, shuffle_buffer=0,
                           rank=0, world_size=1, buckets=buckets, greedy_buckets=buckets is not None)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ("mean", "std", "context", "pooled", "mask", "original_size", "crop_coords", "captions", "labels")
    pending: dict[tuple[int, int], dict[str, list]] = {}  # image (height, width) -> the chunk being filled
    seen: dict[str, set[str]] = {name: set() for name in labels or {}}
    chunks: list[str] = []
    chunk_sizes: dict[str, list[int]] = {}
    n_done, skipped, max_len = 0, 0, 0
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"caching {split}", unit="img")

    def flush(size: tuple[int, int]) -> None:
        part = pending.pop(size, None)
        if not part or not part["captions"]:
            return
        tensors = {k: torch.cat(part[k]) for k in fields if k not in ("captions", "labels")}
        name = CHUNK.format(len(chunks))
        metadata = {"captions": json.dumps(part["captions"]), "size": f"{size[0]}x{size[1]}"}
        if labels:
            metadata["labels"] = json.dumps(part["labels"])
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / name), metadata=metadata)
        chunks.append(name)
        chunk_sizes[name] = list(size)

    device = next(vae.parameters()).device
    memo: dict[str, tuple[torch.Tensor, ...]] = {}  # caption -> (tokens, mask, pooled): encode each text once
    # one worker decodes PNGs while this process encodes (the dataset yields whole batches)
    loader = ShieldedLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
    for batch in loader:
        skipped += int(batch.get("skipped", 0))
        if max_samples is not None:
            room = max_samples - n_done
            if room <= 0:
                break
            batch = {**batch, **{k: batch[k][:room] for k in ("image", "original_size", "crop_coords")},
                     "caption": list(batch["caption"])[:room], "meta": list(batch["meta"])[:room]}
        posterior = vae.encode(batch["image"].to(device))
        new = [c for c in dict.fromkeys(batch["caption"]) if c not in memo]
        if new:
            cond = text_encoder.condition(new)
            memo.update(zip(new, zip(cond.tokens.half().cpu(), cond.full_mask().to(torch.uint8).cpu(), cond.pooled.half().cpu())))
        tokens, mask, pooled = (torch.stack([memo[c][i] for c in batch["caption"]]) for i in range(3))
        max_len = max(max_len, int(mask.sum(1).max()))
        size = tuple(batch["image"].shape[2:])
        part = pending.setdefault(size, {k: [] for k in fields})
        part["mean"].append(((posterior.mean - shift) * scale).float().cpu())
        part["std"].append((posterior.std * scale).float().cpu())
        part["context"].append(tokens)
        part["pooled"].append(pooled)
        part["mask"].append(mask)
        part["original_size"].append(batch["original_size"].to(torch.int32))
        part["crop_coords"].append(batch["crop_coords"].to(torch.int32))
        part["captions"].extend(batch["caption"])
        for meta in batch["meta"] if labels else ():
            row = {name: label_at(meta, path) for name, path in labels.items()}
            part["labels"].append(row)
            for name, value in row.items():
                if value is not None:
                    seen[name].add(value)
        n_done += len(batch["caption"])
        if bar is not None:
            bar.update(len(batch["caption"]))
        if len(part["captions"]) >= chunk_size:
            flush(size)
    for size in sorted(pending):
        flush(size)
    if bar is not None:
        bar.close()
    out = {"samples": n_done, "chunks": chunks, "chunk_sizes": chunk_sizes, "skipped": skipped, "max_tokens": max_len}
    return {**out, "label_values": seen} if labels else out


def parts_provenance(vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, str | None]:
    """The weight hashes that tie a cache (or a denoiser) to the parts it was made with."""
    return {"vae": weights_hash(vae), "text_encoder": weights_hash(text_encoder)}


def build_latent_cache(vae: torch.nn.Module, text_encoder: torch.nn.Module, data_dir: str | Path,
                       out_dir: str | Path, resolution: int, splits: tuple[str, ...] = ("train", "val"),
                       batch_size: int = 256, progress: bool = True, max_samples: int | None = None,
                       buckets: BucketSpec | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the cache for ``splits`` (see module docstring) and return its info.json contents.

    ``labels``: name -> json path (:func:`label_at`) of labels to store beside each sample; their classes are
    the values seen in any split, sorted.

    Written into a fresh folder beside ``out_dir`` and swapped in when complete: an old cache there is
    replaced whole (never partly overwritten), and a failed run leaves the old one as it was.
    ``max_samples`` caps each split at its first that many samples (None: all)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        vae.eval()
        text_encoder.eval()
        info: dict[str, Any] = {"format": CACHE_FORMAT, "data_dir": str(data_dir), "resolution": resolution,
                                "dataset": read_info(data_dir).get("name") if Path(data_dir).is_dir() else None,
                                "parts": parts_provenance(vae, text_encoder), "splits": {},
                                "buckets": dataclasses.asdict(buckets) if buckets is not None else None}
        values: dict[str, set[str]] = {name: set() for name in labels or {}}
        for split in splits:
            done = encode_split(vae, text_encoder, data_dir, split, work / split, resolution, batch_size,
                                progress=progress, max_samples=max_samples, buckets=buckets, labels=labels)
            for name, seen in done.pop("label_values", {}).items():
                values[name] |= seen
            info["splits"][split] = done
        if labels:
            info["labels"] = {name: {"path": path, "classes": sorted(values[name])} for name, path in labels.items()}
        empty = text_encoder.condition([""])
        save_file({k: (v.half() if v.is_floating_point() else v).cpu().contiguous()
                   for k, v in empty.to_tensors().items()}, str(work / EMPTY))
        info["max_tokens"] = max([s["max_tokens"] for s in info["splits"].values()] + [int(empty.full_mask().sum())])
        write_json(work / "info.json", info)
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return info


def read_cache_info(cache_dir: str | Path) -> dict[str, Any]:
    """A cache's info.json; a missing cache says how to build one."""
    path = Path(cache_dir) / "info.json"
    if not path.is_file():
        raise CacheError(f"no latent cache at {cache_dir} (info.json missing): run `ldm cache --vae ... "
                         f"--text-encoder ... --data ... --out {cache_dir}` (make train-ldm does)")
    return read_json(path)


def check_cache_parts(info: dict[str, Any], vae: torch.nn.Module, text_encoder: torch.nn.Module,
                      cache_dir: str | Path) -> None:
    """Refuse a cache written by other parts than ``vae``/``text_encoder`` (their weight hashes differ)."""
    recorded = info.get("parts")
    if not recorded:
        raise CacheError(f"latent cache {cache_dir} records no part hashes (written by an older ldm): rebuild it "
                         "with `ldm cache` (make train-ldm does)")
    for name, current in parts_provenance(vae, text_encoder).items():
        if current is not None and recorded.get(name) != current:
            raise CacheError(f"latent cache {cache_dir} was written with another {name} (sha256 "
                             f"{str(recorded.get(name))[:12]}…) than the configured one ({current[:12]}…): "
                             "rebuild it with `ldm cache` (make train-ldm does)")


class LatentDataset(Dataset):
    """One split of the cache held in memory; ``__getitems__`` gathers whole batches at once.

    Reads exactly the chunks ``info.json`` lists and checks their sample count against it. Chunks of one latent
    shape form a *group* (a bucket; a cache without buckets has one), stored contiguously: indices
    ``offsets[g]:offsets[g + 1]`` are group g, whose latents are ``shapes[g]`` (h, w). A batch comes from one group.
    """

    def __init__(self, cache_dir: str | Path, split: str):
        self.dir = Path(cache_dir)
        info = read_cache_info(self.dir)
        if info.get("format") != CACHE_FORMAT:
            raise CacheError(f"latent cache {self.dir} has format {info.get('format')} (this ldm reads "
                             f"{CACHE_FORMAT}): rebuild it with `ldm cache` (make train-ldm does)")
        listed = info["splits"].get(split)
        if listed is None or not listed["chunks"]:
            raise CacheError(f"latent cache {self.dir} has no {split!r} split; rebuild it with `ldm cache`")
        keep = int(info["max_tokens"])
        names = ("mean", "std", "context", "mask", "pooled", "original_size", "crop_coords")
        grouped: dict[tuple[int, ...], dict[str, list]] = {}
        self.label_classes: dict[str, list[str]] = {k: v["classes"] for k, v in (info.get("labels") or {}).items()}
        for name in listed["chunks"]:
            path = self.dir / split / name
            if not path.is_file():
                raise CacheError(f"latent cache chunk {path} listed in info.json is missing: rebuild the cache")
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                shape = tuple(f.get_slice("mean").get_shape()[2:])
                parts = grouped.setdefault(shape, {k: [] for k in (*names, "captions", "labels")})
                for k in names:
                    if k in present:
                        t = f.get_tensor(k)
                        parts[k].append(t[:, :keep] if k in ("context", "mask") else t)
                parts["captions"].extend(json.loads(f.metadata()["captions"]))
                if self.label_classes:
                    parts["labels"].extend(json.loads(f.metadata()["labels"]))
        index = {name: {c: i for i, c in enumerate(classes)} for name, classes in self.label_classes.items()}
        self.shapes = list(grouped)
        self.groups: list[dict[str, Any]] = []
        self.offsets = [0]
        self.captions: list[str] = []
        for parts in grouped.values():
            n = len(parts["captions"])
            sizes = {k: torch.cat(parts[k]) for k in ("original_size", "crop_coords")
                     if sum(len(t) for t in parts[k]) == n}  # chunks of an older ldm lack them
            rows = parts["labels"]
            labels = torch.tensor([[index[name].get(row.get(name), -1) for name in index] for row in rows],
                                  dtype=torch.long).reshape(len(rows), len(index))
            self.groups.append({"mean": torch.cat(parts["mean"]), "std": torch.cat(parts["std"]),
                                "cond": Conditioning(torch.cat(parts["context"]), torch.cat(parts["mask"]).bool(),
                                                     torch.cat(parts["pooled"])), "labels": labels, **sizes})
            self.captions.extend(parts["captions"])
            self.offsets.append(self.offsets[-1] + n)
        if len(self.captions) != listed["samples"]:
            raise CacheError(f"latent cache {self.dir / split} holds {len(self.captions)} samples, info.json says "
                             f"{listed['samples']}: rebuild the cache")
        if len(self.groups) == 1:  # one shape: the whole split as plain tensors
            self.mean, self.std, self.cond = self.groups[0]["mean"], self.groups[0]["std"], self.groups[0]["cond"]
        self.labels = (torch.cat([g["labels"] for g in self.groups]) if self.groups
                       else torch.zeros(0, len(index), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.captions)

    def group_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        g = self.group_of(indices[0])
        idx = torch.as_tensor(indices) - self.offsets[g]
        if int(idx.min()) < 0 or int(idx.max()) >= self.offsets[g + 1] - self.offsets[g]:
            raise ValueError(f"a batch of the latent cache must come from one bucket (indices {self.offsets[g]}.."
                             f"{self.offsets[g + 1] - 1}); use LatentBucketBatches for a bucketed cache")
        group = self.groups[g]
        batch = {"latent_mean": group["mean"][idx], "latent_std": group["std"][idx],
                 "cond": group["cond"].index(idx).to(dtype=torch.float32),
                 "caption": [self.captions[i] for i in indices]}
        batch.update({k: group[k][idx].long() for k in ("original_size", "crop_coords") if k in group})
        if self.label_classes:
            batch["labels"] = group["labels"][idx]
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


class LatentBucketBatches(IterableDataset):
    """Whole batches of a bucketed :class:`LatentDataset`, each from one bucket, in a bucket order that depends on
    (seed, epoch) alone, so every DDP rank trains the same bucket shape at every step.

    Each bucket's samples are shuffled by (seed, epoch, bucket) and dealt ``rank::world_size``; with ``drop_last``
    every rank makes ``⌊⌊n_b / world⌋ / batch⌋`` batches of bucket b (equal on every rank). DataLoader workers take
    every ``num_workers``-th batch. ``epoch`` is set by ``ResumableLoader`` before each pass.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        super().__init__()
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.epoch = 0

    def _plan(self) -> list[list[int]]:
        """This rank's batches (global indices) in the shared bucket order."""
        ds, per_group = self.dataset, []
        for g in range(len(ds.groups)):
            start, n = ds.offsets[g], ds.offsets[g + 1] - ds.offsets[g]
            order = torch.arange(n)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + self.epoch) * 1009 + g))
            share = (order[:n // self.world_size * self.world_size] if self.drop_last else order)[self.rank::self.world_size]
            cuts = range(0, len(share) - (self.batch_size - 1 if self.drop_last else 0), self.batch_size)
            per_group.append([(start + share[i:i + self.batch_size]).tolist() for i in cuts])
        if not self.shuffle:
            return [b for batches in per_group for b in batches]
        counts = [len(b) for b in per_group]
        if not sum(counts):
            return []
        order = bucket_schedule(counts, sum(counts), self.seed, self.epoch)
        taken = [0] * len(per_group)
        plan = []
        for g in order:
            plan.append(per_group[g][taken[g]])
            taken[g] += 1
        return plan

    def __len__(self) -> int:
        return len(self._plan())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for indices in self._plan()[worker::workers]:
            yield self.dataset.__getitems__(indices)


def _as_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def load_empty_conditioning(cache_dir: str | Path) -> Conditioning:
    """The "" prompt's conditioning (batch 1, float32) trimmed like the cached contexts."""
    cache_dir = Path(cache_dir)
    keep = int(read_cache_info(cache_dir)["max_tokens"])
    with safe_open(str(cache_dir / EMPTY), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["context"], tensors["mask"] = tensors["context"][:, :keep], tensors["mask"][:, :keep]
    return Conditioning.from_tensors(tensors).to(dtype=torch.float32)


class LatentDataModule(pl.LightningDataModule):
    """Batches ``{"latent_mean", "latent_std", "cond", "caption", "original_size", "crop_coords"}`` from a cache.

    Map-style, so under DDP Lightning's DistributedSampler gives each rank a disjoint share. A bucketed cache
    (several latent shapes) is read through :class:`LatentBucketBatches` instead: one bucket per batch, the same
    bucket order on every rank.
    """

    def __init__(self, cache_dir: str, batch_size: int = 128, val_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.cache_dir, self.batch_size, self.num_workers = cache_dir, batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None

    @property
    def info(self) -> dict[str, Any]:
        return read_cache_info(self.cache_dir)

    @property
    def benchmark(self):
        """The evaluation hooks of the dataset the cache was made from (``ldm.data.registry``), or None."""
        from ldm.data.registry import benchmark_named

        return benchmark_named(self.info.get("dataset"))

    @property
    def label_classes(self) -> dict[str, list[str]]:
        """Each cached label's class names (batches' ``labels`` columns in this order); {} without labels."""
        return {k: v["classes"] for k, v in (self.info.get("labels") or {}).items()}

    def check_parts(self, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        check_cache_parts(self.info, vae, text_encoder, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        info = self.info
        if self.train_set is None:
            self.train_set = LatentDataset(self.cache_dir, "train")
        if self.val_set is None and "val" in info["splits"]:
            self.val_set = LatentDataset(self.cache_dir, "val")

    def empty_conditioning(self) -> Conditioning:
        return load_empty_conditioning(self.cache_dir)

    @property
    def image_sizes(self) -> list[list[int]]:
        """The (height, width) of the cached images, one per bucket (one for a cache without buckets)."""
        sizes = {tuple(v) for split in self.info["splits"].values() for v in (split.get("chunk_sizes") or {}).values()}
        return [list(s) for s in sorted(sizes)]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        from ldm.dist import rank_and_world

        return rank_and_world()

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if len(self.train_set.groups) > 1:
            rank, world = self._rank_world()
            batches = LatentBucketBatches(self.train_set, self.batch_size, self.hparams.seed, rank, world)
            return ResumableLoader(batches, batch_size=None, collate_fn=_as_batch, num_workers=self.num_workers,
                                   seed=self.hparams.seed)
        # pass e is shuffled with a seed of (seed, e) alone and its position is checkpointed: exact resume
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                               collate_fn=_as_batch, num_workers=self.num_workers, seed=self.hparams.seed)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        if self.val_set is None:
            return []
        if len(self.val_set.groups) > 1:
            rank, world = self._rank_world()
            batches = LatentBucketBatches(self.val_set, self.val_batch_size, self.hparams.seed, rank, world,
                                          shuffle=False, drop_last=False)
            return ShieldedLoader(batches, batch_size=None, collate_fn=_as_batch, num_workers=self.num_workers)
        return ShieldedLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                              collate_fn=_as_batch, num_workers=self.num_workers)
