"""Latent cache: VAE latents + text-token embeddings, computed once so U-Net training skips both encoders.

Layout written by ``ldm cache`` (``build_latent_cache``)::

    OUT/info.json                       counts, shapes, the parts' config hashes, the "" prompt's embedding file
    OUT/empty.safetensors               context (1, L, D) + mask (1, L) of the empty prompt (CFG dropout)
    OUT/{train,val}/chunk-NNNNN.safetensors
        mean, std   (N, C, h, w) float32 — the posterior q(z|x) in diffusion space: (μ − shift)·scale, σ·scale
        context     (N, L, D) float16   — token embeddings, L trimmed to the longest caption (exact under masking)
        pooled      (N, E) float16      — the pooled text embedding (for U-Nets with pooled_dim)
        mask        (N, L) uint8        — 1 on real tokens
      metadata "captions": JSON list of the N captions

Training samples z = mean + std·ε each step, exactly ``vae.encode_latents(x, sample=True)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ldm.data.shards import list_shards
from ldm.data.webdata import ShardDataset
from ldm.io import module_config, read_json, write_json
from ldm.data.resumable import ResumableLoader
from ldm.data.workers import ShieldedLoader

CHUNK = "chunk-{:05d}.safetensors"


def config_hash(module: torch.nn.Module) -> str:
    """Short hash of a part's config: a cache is only valid for the parts that wrote it."""
    return hashlib.sha256(json.dumps(module_config(module), sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_split(vae: torch.nn.Module, text_encoder: torch.nn.Module, data_dir: str | Path, split: str,
                 out_dir: Path, resolution: int, batch_size: int = 256, chunk_size: int = 8192,
                 progress: bool = True, num_workers: int = 1, max_samples: int | None = None) -> dict[str, Any]:
    """Encode every sample of ``data_dir/split`` (or its first ``max_samples``) in shard order into chunk
    files; returns counts.

    Each distinct caption goes through the text encoder once (shapes: 20 k distinct of 50 k)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all), got {max_samples}")
    dataset = ShardDataset(list_shards(data_dir, split), resolution, batch_size, shuffle_buffer=0,
                           rank=0, world_size=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, list] = {"mean": [], "std": [], "context": [], "pooled": [], "mask": [], "captions": []}
    n_done, n_chunks, skipped, max_len = 0, 0, 0, 0
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"caching {split}", unit="img")

    def flush() -> None:
        nonlocal n_chunks, pending
        if not pending["captions"]:
            return
        tensors = {k: torch.cat(pending[k]) for k in ("mean", "std", "context", "pooled", "mask")}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / CHUNK.format(n_chunks)),
                  metadata={"captions": json.dumps(pending["captions"])})
        n_chunks += 1
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
            batch = {**batch, "image": batch["image"][:room], "caption": list(batch["caption"])[:room]}
        posterior = vae.encode(batch["image"].to(device))
        new = [c for c in dict.fromkeys(batch["caption"]) if c not in memo]
        if new:
            tokens, pooled, mask = text_encoder.encode_text(new, return_mask=True)
            memo.update(zip(new, zip(tokens.half().cpu(), mask.to(torch.uint8).cpu(), pooled.half().cpu())))
        tokens, mask, pooled = (torch.stack([memo[c][i] for c in batch["caption"]]) for i in range(3))
        max_len = max(max_len, int(mask.sum(1).max()))
        pending["mean"].append(((posterior.mean - shift) * scale).float().cpu())
        pending["std"].append((posterior.std * scale).float().cpu())
        pending["context"].append(tokens)
        pending["pooled"].append(pooled)
        pending["mask"].append(mask)
        pending["captions"].extend(batch["caption"])
        n_done += len(batch["caption"])
        if bar is not None:
            bar.update(len(batch["caption"]))
        if len(pending["captions"]) >= chunk_size:
            flush()
    flush()
    if bar is not None:
        bar.close()
    return {"samples": n_done, "chunks": n_chunks, "skipped": skipped, "max_tokens": max_len}


def build_latent_cache(vae: torch.nn.Module, text_encoder: torch.nn.Module, data_dir: str | Path,
                       out_dir: str | Path, resolution: int, splits: tuple[str, ...] = ("train", "val"),
                       batch_size: int = 256, progress: bool = True, max_samples: int | None = None
                       ) -> dict[str, Any]:
    """Write the cache for ``splits`` (see module docstring) and return its info.json contents.

    ``max_samples`` caps each split at its first that many samples (None: all)."""
    out = Path(out_dir)
    vae.eval()
    text_encoder.eval()
    info: dict[str, Any] = {"data_dir": str(data_dir), "resolution": resolution,
                            "vae": config_hash(vae), "text_encoder": config_hash(text_encoder), "splits": {}}
    for split in splits:
        info["splits"][split] = encode_split(vae, text_encoder, data_dir, split, out / split, resolution,
                                             batch_size, progress=progress, max_samples=max_samples)
    empty, empty_pooled, empty_mask = text_encoder.encode_text([""], return_mask=True)
    save_file({"context": empty.half().cpu().contiguous(), "mask": empty_mask.to(torch.uint8).cpu().contiguous(),
               "pooled": empty_pooled.half().cpu().contiguous()}, str(out / "empty.safetensors"))
    info["max_tokens"] = max([s["max_tokens"] for s in info["splits"].values()] + [int(empty_mask.sum())])
    write_json(out / "info.json", info)
    return info


class LatentDataset(Dataset):
    """One split of the cache held in memory; ``__getitems__`` gathers whole batches at once."""

    def __init__(self, cache_dir: str | Path, split: str):
        self.dir = Path(cache_dir)
        info = read_json(self.dir / "info.json")
        chunks = sorted((self.dir / split).glob("chunk-*.safetensors"))
        if not chunks:
            raise FileNotFoundError(f"latent cache {self.dir / split} has no chunks; run `ldm cache` first")
        keep = int(info["max_tokens"])
        parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "context": [], "mask": []}
        pooled: list[torch.Tensor] = []
        self.captions: list[str] = []
        for path in chunks:
            with safe_open(str(path), framework="pt") as f:
                for k in parts:
                    t = f.get_tensor(k)
                    parts[k].append(t[:, :keep] if k in ("context", "mask") else t)
                if "pooled" in f.keys():  # caches written before pooled conditioning lack it
                    pooled.append(f.get_tensor("pooled"))
                self.captions.extend(json.loads(f.metadata()["captions"]))
        self.mean, self.std = torch.cat(parts["mean"]), torch.cat(parts["std"])
        self.context, self.mask = torch.cat(parts["context"]), torch.cat(parts["mask"]).bool()
        self.pooled = torch.cat(pooled) if len(pooled) == len(chunks) else None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices)
        batch = {"latent_mean": self.mean[idx], "latent_std": self.std[idx], "context": self.context[idx].float(),
                 "mask": self.mask[idx], "caption": [self.captions[i] for i in indices]}
        if self.pooled is not None:
            batch["pooled"] = self.pooled[idx].float()
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


def _as_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def load_empty_context(cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The "" prompt's (context (1, L, D) float32, mask (1, L) bool) trimmed like the cached contexts."""
    cache_dir = Path(cache_dir)
    keep = int(read_json(cache_dir / "info.json")["max_tokens"])
    with safe_open(str(cache_dir / "empty.safetensors"), framework="pt") as f:
        return f.get_tensor("context")[:, :keep].float(), f.get_tensor("mask")[:, :keep].bool()


def load_empty_pooled(cache_dir: str | Path) -> torch.Tensor | None:
    """The "" prompt's pooled embedding (1, E) float32, or None for a cache written without it."""
    with safe_open(str(Path(cache_dir) / "empty.safetensors"), framework="pt") as f:
        return f.get_tensor("pooled").float() if "pooled" in f.keys() else None


class LatentDataModule(pl.LightningDataModule):
    """Batches ``{"latent_mean", "latent_std", "context", "mask", "caption"}`` (+ ``"pooled"``) from a latent cache.

    Map-style, so under DDP Lightning's DistributedSampler gives each rank a disjoint share.
    """

    def __init__(self, cache_dir: str = "checkpoints/shapes/cache", batch_size: int = 128,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.cache_dir, self.batch_size, self.num_workers = cache_dir, batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if not (Path(self.cache_dir) / "info.json").is_file():
            raise FileNotFoundError(f"no latent cache at {self.cache_dir} (info.json missing): run `ldm cache --vae ... "
                                    f"--text-encoder ... --data ... --out {self.cache_dir}` (make train-ldm does)")
        if self.train_set is None:
            self.train_set = LatentDataset(self.cache_dir, "train")
        if self.val_set is None and (Path(self.cache_dir) / "val").is_dir():
            self.val_set = LatentDataset(self.cache_dir, "val")

    def empty_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        return load_empty_context(self.cache_dir)

    def empty_pooled(self) -> torch.Tensor | None:
        return load_empty_pooled(self.cache_dir)

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
