"""Latent cache: VAE latents + the text conditioning, computed once so denoiser training skips both encoders.

Layout written by ``ldm cache`` (``build_latent_cache``)::

    OUT/info.json                       samples and chunk list per split, the parts' weight hashes, data source
    OUT/empty.safetensors               the "" prompt's conditioning (context, mask, pooled) for CFG dropout
    OUT/{train,val}/chunk-NNNNN.safetensors
        mean, std   (N, C, h, w) float32 — the posterior q(z|x) in diffusion space: (μ − shift)·scale, σ·scale
        context     (N, L, D) float16   — token embeddings, L trimmed to the longest caption (exact under masking)
        pooled      (N, E) float16      — the pooled text embedding
        mask        (N, L) uint8        — 1 on real tokens
      metadata "captions": JSON list of the N captions
      metadata "labels":   JSON list of N objects {label: value or null} (only when labels were asked for)

Labels: ``build_latent_cache(..., labels={"color": "objects.only.color"})`` also stores, per sample, the value
at each path of its json metadata (:func:`label_at`); info.json lists each label's path and its classes (the
values seen, sorted), and batches carry ``labels`` (B, A) class indices, −1 where the json has no value.
A dataset may name default labels (``Benchmark.label_paths``; shapes: the attributes of one-object scenes).

Training samples z = mean + std·ε each step, exactly ``vae.encode_latents(x, sample=True)``.

Provenance: a cache is only valid for the VAE and text encoder that wrote it. ``info.json`` records the
sha256 of both parts' weights, the sample count and the chunk files; :class:`LatentDataModule` reads exactly
those chunks and checks the counts, and ``LatentDiffusion`` refuses a cache written by other parts. A new
cache is written into a fresh folder beside ``OUT`` and swapped in whole, so a cache never mixes two runs.
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader, Dataset

from ldm.conditioning import Conditioning
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
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Encode every sample of ``data_dir/split`` (or its first ``max_samples``) in shard order into chunk
    files; returns counts and the chunk names (and, with ``labels``, the values seen under ``label_values``).

    Each distinct caption goes through the text encoder once (shapes: 20 k distinct of 50 k)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all), got {max_samples}")
    dataset = ShardDataset(list_shards(data_dir, split), resolution, batch_size, shuffle_buffer=0,
                           rank=0, world_size=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, list] = {"mean": [], "std": [], "context": [], "pooled": [], "mask": [], "captions": [],
                                "labels": []}
    seen: dict[str, set[str]] = {name: set() for name in labels or {}}
    chunks: list[str] = []
    n_done, skipped, max_len = 0, 0, 0
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"caching {split}", unit="img")

    def flush() -> None:
        nonlocal pending
        if not pending["captions"]:
            return
        tensors = {k: torch.cat(pending[k]) for k in ("mean", "std", "context", "pooled", "mask")}
        name = CHUNK.format(len(chunks))
        metadata = {"captions": json.dumps(pending["captions"])}
        if labels:
            metadata["labels"] = json.dumps(pending["labels"])
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / name), metadata=metadata)
        chunks.append(name)
        pending = {k: [] for k in pending}

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
            batch = {**batch, "image": batch["image"][:room], "caption": list(batch["caption"])[:room],
                     "meta": list(batch["meta"])[:room]}
        posterior = vae.encode(batch["image"].to(device))
        new = [c for c in dict.fromkeys(batch["caption"]) if c not in memo]
        if new:
            cond = text_encoder.condition(new)
            memo.update(zip(new, zip(cond.tokens.half().cpu(), cond.full_mask().to(torch.uint8).cpu(), cond.pooled.half().cpu())))
        tokens, mask, pooled = (torch.stack([memo[c][i] for c in batch["caption"]]) for i in range(3))
        max_len = max(max_len, int(mask.sum(1).max()))
        pending["mean"].append(((posterior.mean - shift) * scale).float().cpu())
        pending["std"].append((posterior.std * scale).float().cpu())
        pending["context"].append(tokens)
        pending["pooled"].append(pooled)
        pending["mask"].append(mask)
        pending["captions"].extend(batch["caption"])
        for meta in batch["meta"] if labels else ():
            row = {name: label_at(meta, path) for name, path in labels.items()}
            pending["labels"].append(row)
            for name, value in row.items():
                if value is not None:
                    seen[name].add(value)
        n_done += len(batch["caption"])
        if bar is not None:
            bar.update(len(batch["caption"]))
        if len(pending["captions"]) >= chunk_size:
            flush()
    flush()
    if bar is not None:
        bar.close()
    out = {"samples": n_done, "chunks": chunks, "skipped": skipped, "max_tokens": max_len}
    return {**out, "label_values": seen} if labels else out


def parts_provenance(vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, str | None]:
    """The weight hashes that tie a cache (or a denoiser) to the parts it was made with."""
    return {"vae": weights_hash(vae), "text_encoder": weights_hash(text_encoder)}


def build_latent_cache(vae: torch.nn.Module, text_encoder: torch.nn.Module, data_dir: str | Path,
                       out_dir: str | Path, resolution: int, splits: tuple[str, ...] = ("train", "val"),
                       batch_size: int = 256, progress: bool = True, max_samples: int | None = None,
                       labels: dict[str, str] | None = None) -> dict[str, Any]:
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
                                "parts": parts_provenance(vae, text_encoder), "splits": {}}
        values: dict[str, set[str]] = {name: set() for name in labels or {}}
        for split in splits:
            done = encode_split(vae, text_encoder, data_dir, split, work / split, resolution, batch_size,
                                progress=progress, max_samples=max_samples, labels=labels)
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

    Reads exactly the chunks ``info.json`` lists and checks their sample count against it."""

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
        parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "context": [], "mask": [], "pooled": []}
        self.captions: list[str] = []
        self.label_classes: dict[str, list[str]] = {k: v["classes"] for k, v in (info.get("labels") or {}).items()}
        rows: list[dict[str, str | None]] = []
        for name in listed["chunks"]:
            path = self.dir / split / name
            if not path.is_file():
                raise CacheError(f"latent cache chunk {path} listed in info.json is missing: rebuild the cache")
            with safe_open(str(path), framework="pt") as f:
                for k in parts:
                    t = f.get_tensor(k)
                    parts[k].append(t[:, :keep] if k in ("context", "mask") else t)
                self.captions.extend(json.loads(f.metadata()["captions"]))
                if self.label_classes:
                    rows.extend(json.loads(f.metadata()["labels"]))
        if len(self.captions) != listed["samples"]:
            raise CacheError(f"latent cache {self.dir / split} holds {len(self.captions)} samples, info.json says "
                             f"{listed['samples']}: rebuild the cache")
        self.mean, self.std = torch.cat(parts["mean"]), torch.cat(parts["std"])
        self.cond = Conditioning(torch.cat(parts["context"]), torch.cat(parts["mask"]).bool(), torch.cat(parts["pooled"]))
        index = {name: {c: i for i, c in enumerate(classes)} for name, classes in self.label_classes.items()}
        self.labels = torch.tensor([[index[name].get(row.get(name), -1) for name in index] for row in rows],
                                   dtype=torch.long).reshape(len(rows), len(index))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices)
        batch = {"latent_mean": self.mean[idx], "latent_std": self.std[idx],
                 "cond": self.cond.index(idx).to(dtype=torch.float32), "caption": [self.captions[i] for i in indices]}
        if self.label_classes:
            batch["labels"] = self.labels[idx]
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


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
    """Batches ``{"latent_mean", "latent_std", "cond", "caption"}`` from a latent cache.

    Map-style, so under DDP Lightning's DistributedSampler gives each rank a disjoint share.
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

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        # pass e is shuffled with a seed of (seed, e) alone and its position is checkpointed: exact resume
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                               collate_fn=_as_batch, num_workers=self.num_workers, seed=self.hparams.seed)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        if self.val_set is None:
            return []
        return ShieldedLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                              collate_fn=_as_batch, num_workers=self.num_workers)
