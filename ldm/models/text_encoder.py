"""Contrastive training of a tiny CLIP whose text tower becomes the LDM text conditioner.

CLIP (Radford et al. 2021): an image encoder and a text encoder are trained jointly so that the N true
(image, caption) pairs of a batch score higher than the N² − N wrong ones, with the symmetric
cross-entropy over scaled cosine similarities of CLIP fig. 3. The towers are open_clip's
(``VisionTransformer``, ``TextTransformer``, wrapped as the exportable parts of
``ldm.modules.text_encoder``), the tokenizer is open_clip's BPE and the loss is open_clip's ``ClipLoss``
with ``gather_with_grad`` + ``local_loss``, so under DDP every rank scores its rows against the whole
global batch and gradients flow through the gather (the mean over ranks equals the single-process loss
on the concatenated batch). The temperature is learnt as ``logit_scale = log(1/τ)``, initialised at
τ = 0.07 and clipped so the logits are never scaled by more than 100 (CLIP sec. 2.5).

Logged: ``train/loss``, ``train/logit_scale`` (exp), ``val/loss``, val retrieval recall@1/5 in both
directions, and, when the training data's module has zero-shot heads (``ldm.data.registry``; shapes has
colour, shape and position), zero-shot accuracy (val images classified against prompt ensembles, CLIP
sec. 3.1.4). :meth:`ContrastiveCLIP.export` writes the text conditioner
part and, inside it, the image tower as its own part (``image_encoder/``) for CLIP score / FD.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from ldm.data.registry import ZeroShotPrompts, benchmark_named
from ldm.dist import all_reduce, is_distributed
from ldm.io import config_from_dict, save_part
from ldm.models.base import PartModule
from ldm.modules.text_encoder import (
    CLIPImageEncoder,
    CLIPImageEncoderConfig,
    CLIPTextConditioner,
    CLIPTextConditionerConfig,
)

IMAGE_ENCODER_DIR = "image_encoder"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP sec. 2.5: logits never scaled by more than 100

# Tiny towers for 32 px shapes (the defaults; a config overrides any key).
DEFAULT_TEXT = {"context_length": 24, "width": 128, "heads": 4, "layers": 2, "embed_dim": 128}
DEFAULT_IMAGE = {"image_size": 32, "patch_size": 8, "width": 128, "heads": 4, "layers": 2, "embed_dim": 128}


def make_clip_loss(rank: int = 0, world_size: int = 1) -> ClipLoss:
    """open_clip's symmetric InfoNCE (CLIP fig. 3) with ``gather_with_grad`` + ``local_loss`` for DDP.

    Each rank computes ``(CE(s·I_r Tᵀ, y) + CE(s·T_r Iᵀ, y)) / 2`` for its own rows against the gathered
    global batch; DDP's gradient average then equals the gradient of the single-process loss.
    """
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def hard_negative_loss(image_features: torch.Tensor, text_features: torch.Tensor, negative_features: torch.Tensor,
                       owner: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Each image must score its caption above each of that caption's hard negatives.

    For every negative n of caption i (``owner[n] = i``): CE over the pair of scaled cosines
    ``s·(⟨I_i, T_i⟩, ⟨I_i, N_n⟩)`` with the true caption as target, averaged over negatives (NegCLIP's
    extra negatives, Yuksekgonul et al. 2023, kept per sample so no gather is needed under DDP).
    Features are L2-normalized: images/texts (B, E), negatives (M, E); ``logit_scale`` is exp(log-scale).
    """
    image = image_features[owner]
    logits = logit_scale * torch.stack([(image * text_features[owner]).sum(-1), (image * negative_features).sum(-1)], 1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """A stable 63-bit id per caption text (equal texts ↔ equal ids), so captions can be all-gathered."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1
                         for c in captions], dtype=torch.long)


def retrieval_recall(query: torch.Tensor, keys: torch.Tensor, query_group: torch.Tensor, key_group: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Recall@k of cosine retrieval: a hit when one of the top-k keys has the query's group.

    Groups are caption ids, so a caption shared by several images (common on shapes) retrieves any of
    them correctly. ``query``/``keys`` are L2-normalized (Q, E) / (N, E).
    """
    sim = query @ keys.T
    top = sim.topk(min(max(ks), keys.shape[0]), dim=1).indices
    hits = key_group[top] == query_group[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def zero_shot_predictions(text_encoder: CLIPTextConditioner, image_features: torch.Tensor, zs: ZeroShotPrompts
                          ) -> dict[str, torch.Tensor]:
    """Zero-shot class predictions (N, A) for L2-normalized image features (CLIP sec. 3.1.4).

    ``"joint"``: the attributes of the single best-matching prompt (classification over the whole label
    space). ``"ensemble"``: per attribute, the class whose prompt ensemble (normalized mean of its
    prompts' normalized embeddings, so the other attributes average out) is nearest.
    """
    texts = torch.cat([F.normalize(text_encoder.encode_text(zs.prompts[i:i + 512])[1].float(), dim=-1)
                       for i in range(0, len(zs.prompts), 512)]).to(image_features)
    labels = zs.labels.to(image_features.device)
    joint = labels[(image_features @ texts.T).argmax(dim=1)]
    ensemble = []
    for a, names in enumerate(zs.classes.values()):
        centroids = torch.stack([F.normalize(texts[labels[:, a] == c].mean(dim=0), dim=0) for c in range(len(names))])
        ensemble.append((image_features @ centroids.T).argmax(dim=1))
    return {"joint": joint, "ensemble": torch.stack(ensemble, dim=1)}


def _occurrences(caption: str, groups: dict[str, list[str]]) -> list[list[tuple[int, int, str]]]:
    """Per group, its non-overlapping whole-word occurrences ``(start, end, word)`` in ``caption``, in order.

    Groups claim text in their order: a match overlapping one of an earlier group is skipped, and at any
    position the longest member wins ("top left" over "top", "left of" over "left")."""
    taken: list[tuple[int, int]] = []
    found = []
    for words in groups.values():
        matches = sorted((m.start(), -len(w), w, m.end()) for w in words
                         for m in re.finditer(rf"\b{re.escape(w)}\b", caption))
        kept: list[tuple[int, int, str]] = []
        for start, _, word, end in matches:
            if not any(start < e and s < end for s, e in taken + [(s, e) for s, e, _ in kept]):
                kept.append((start, end, word))
        taken += [(s, e) for s, e, _ in kept]
        found.append(kept)
    return found


def swap_attribute(caption: str, groups: dict[str, list[str]], rng: random.Random,
                   max_negatives: int | None = None) -> list[str]:
    """Hard negative captions: a group's word or phrase in ``caption`` replaced by another member of the group.

    NegCLIP (Yuksekgonul et al. 2023, sec. 4) adds such minimally different captions as negatives so
    the model cannot match captions as bags of easy words. One negative per group present, or per
    ``max_negatives`` groups drawn at random among them. A group's match is its earliest whole-word
    occurrence (the longest word there); matches overlapping one of an earlier group are skipped;
    "a"/"an" are fixed after the swap, so the article never gives a negative away. [] when none occurs.
    """
    found: list[tuple[list[str], str, int, int]] = []
    for words, occurrences in zip(groups.values(), _occurrences(caption, groups)):
        if occurrences and len(words) > 1:  # the earliest occurrence
            start, end, word = occurrences[0]
            found.append((words, word, start, end))
    if max_negatives is not None and len(found) > max_negatives:
        found = rng.sample(found, max_negatives)
    negatives = []
    for words, word, start, end in found:
        replacement = rng.choice([w for w in words if w != word])
        negatives.append(_fix_articles(caption[:start] + replacement + caption[end:]))
    return negatives


def exchange_within(caption: str, groups: dict[str, list[str]], rng: random.Random) -> list[str]:
    """Hard negatives with the caption's own words: where a group occurs twice with different members, the two
    are exchanged ("a red circle left of a blue square" → "a blue circle left of a red square").

    NegCLIP's order negatives (Yuksekgonul et al. 2023, sec. 4: swapping two attributes or two nouns of a
    caption): the bag of words stays, only which attribute goes with which object changes, so a text encoder
    that reads captions as bags of words cannot tell them apart. One negative per group with two different
    members present (a random pair of them when more); occurrences as in :func:`swap_attribute`; "a"/"an"
    fixed. [] when no group occurs twice.
    """
    negatives = []
    for occurrences in _occurrences(caption, groups):
        pairs = [(a, b) for i, a in enumerate(occurrences) for b in occurrences[i + 1:] if a[2] != b[2]]
        if not pairs:
            continue
        (s1, e1, w1), (s2, e2, w2) = rng.choice(pairs)
        negatives.append(_fix_articles(caption[:s1] + w2 + caption[e1:s2] + w1 + caption[e2:]))
    return negatives


def _word_groups(spec: str | dict | None, option: str) -> dict[str, list[str]] | None:
    """Word groups from a config value: a registered dataset's (``Benchmark.hard_negative_groups``), a dict of
    lists, or None."""
    if isinstance(spec, str):  # a registered dataset's word groups
        groups = getattr(benchmark_named(spec), "hard_negative_groups", lambda: None)()
        if groups is None:
            raise ValueError(f"model.{option}: dataset {spec!r} has no hard-negative word groups; "
                             "give a dict of word groups instead")
        return groups
    if isinstance(spec, dict):
        return {str(k): [str(w) for w in v] for k, v in spec.items()}
    if spec is None:
        return None
    raise ValueError(f"model.{option} must be a dataset name, a dict of word groups or null, got {spec!r}")


def _fix_articles(text: str) -> str:
    return re.sub(r"\b([Aa])n? (?=(\w))", lambda m: m.group(1) + ("n " if m.group(2) in "aeiou" else " "), text)


class ContrastiveCLIP(PartModule):
    """LightningModule: image tower + text tower + learnable temperature, trained with ``ClipLoss``.

    ``text`` / ``image`` are dicts of :class:`CLIPTextConditionerConfig` / :class:`CLIPImageEncoderConfig`
    fields over the tiny defaults; ``text["layer"]`` picks the token states the exported conditioner gives.
    ``optimizer`` / ``lr_schedule``: the training base's blocks; defaults as open_clip's (AdamW betas
    (0.9, 0.98), eps 1e-6, weight decay 0.1 except on gains, biases, embeddings and the temperature).
    """

    default_optimizer = {"lr": 2e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1}
    default_lr_schedule = {"warmup_steps": 50, "decay": "cosine"}

    def __init__(
        self,
        text: dict | None = None,
        image: dict | None = None,
        optimizer: dict[str, Any] | None = None,
        lr_schedule: dict[str, Any] | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        zero_shot: bool | str = True,
        hard_negatives: str | dict | None = None,
        hard_negative_weight: float = 1.0,
        hard_negatives_per_caption: int | None = 1,
        exchange_negatives: str | dict | None = None,
    ):
        super().__init__(optimizer, lr_schedule)
        self.save_hyperparameters()
        text_config = config_from_dict(CLIPTextConditionerConfig, {**DEFAULT_TEXT, **(text or {})}, "model.text")
        if text_config.backend != "open_clip":
            raise ValueError("ContrastiveCLIP trains the open_clip backend; set model.text.backend: open_clip")
        self.text = CLIPTextConditioner(text_config).unfreeze()
        self.image = CLIPImageEncoder(config_from_dict(CLIPImageEncoderConfig, {**DEFAULT_IMAGE, **(image or {})},
                                                       "model.image"))
        if self.text.pooled_dim != self.image.config.embed_dim:
            raise ValueError(f"text embed_dim {self.text.pooled_dim} ≠ image embed_dim {self.image.config.embed_dim}: "
                             "set model.text.embed_dim and model.image.embed_dim equal")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.loss_fn = make_clip_loss()
        self.zero_shot_prompts: ZeroShotPrompts | None = None  # set in setup() from the training data's benchmark
        self._benchmark = None
        self.swap_groups = _word_groups(hard_negatives, "hard_negatives")
        self.exchange_groups = _word_groups(exchange_negatives, "exchange_negatives")
        self._rng = random.Random(0)
        self._dropped = 0
        self._val: dict[str, list[torch.Tensor]] = {}

    # -- forward -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            self.loss_fn = make_clip_loss(trainer.global_rank, trainer.world_size)
        zero_shot = self.hparams.zero_shot
        if isinstance(zero_shot, str):  # a registered dataset names the heads
            self._benchmark = benchmark_named(zero_shot)
            if self._benchmark is None:
                raise ValueError(f"model.zero_shot: {zero_shot!r} is not a registered dataset with zero-shot heads")
        else:  # the training data's own heads, if its module has some
            self._benchmark = getattr(getattr(trainer, "datamodule", None), "benchmark", None)
        if zero_shot and self._benchmark is not None:
            self.zero_shot_prompts = self._benchmark.zero_shot_prompts()

    def encode(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized image and text embeddings (B, E) each (CLIP fig. 3: ``l2_normalize(I_e)``…)."""
        image_features = self.image.encode_image(images, normalize=True)
        ids, mask = self.text.tokenize(captions)
        text_features = F.normalize(self.text.pooled_embedding(ids, mask), dim=-1)
        return image_features, text_features

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, captions = self._equal_across_ranks(batch["image"], list(batch["caption"]))
        negatives = self._hard_negatives(captions)
        flat = [n for per_caption in negatives for n in per_caption]
        image_features = self.image.encode_image(images, normalize=True)
        ids, mask = self.text.tokenize(captions + flat)  # one text forward for captions and negatives
        text_features = F.normalize(self.text.pooled_embedding(ids, mask), dim=-1)
        text_features, negative_features = text_features[: len(captions)], text_features[len(captions):]
        scale = self.logit_scale.exp()
        loss = clip_loss = self.loss_fn(image_features, text_features, scale)
        batch_size = len(captions)
        if flat:
            owner = torch.tensor([i for i, per in enumerate(negatives) for _ in per], device=image_features.device)
            hard = hard_negative_loss(image_features, text_features, negative_features, owner, scale)
            loss = clip_loss + self.hparams.hard_negative_weight * hard
            self.log("train/hard_negative_loss", hard, batch_size=batch_size)
            self.log("train/clip_loss", clip_loss, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", scale.detach(), batch_size=batch_size)
        return loss

    def _equal_across_ranks(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Cut this rank's batch to the smallest across ranks (ClipLoss all-gathers equal shapes only).

        Only an epoch's last, partial batch can differ; the samples cut are counted in ``train/dropped``.
        """
        if len(captions) != images.shape[0]:
            raise ValueError(f"batch has {images.shape[0]} images but {len(captions)} captions")
        if not is_distributed():
            return images, captions
        n = int(all_reduce(torch.tensor(len(captions), device=images.device), "min"))
        if n < len(captions):
            self._dropped += len(captions) - n
            self.log("train/dropped", float(self._dropped), reduce_fx="max", batch_size=n)
        return images[:n], captions[:n]

    def _hard_negatives(self, captions: Sequence[str]) -> list[list[str]]:
        """Per caption, up to ``hard_negatives_per_caption`` negatives drawn among its word swaps
        (:func:`swap_attribute` over ``hard_negatives``) and exchanges (:func:`exchange_within` over
        ``exchange_negatives``)."""
        if (self.swap_groups is None and self.exchange_groups is None) or self.hparams.hard_negative_weight <= 0:
            return []
        k = self.hparams.hard_negatives_per_caption
        # drawn from the global stream, which SeedEveryStep reseeds per batch and rank: resumes exactly
        self._rng.seed(random.getrandbits(63))
        if self.exchange_groups is None:
            return [swap_attribute(caption, self.swap_groups, self._rng, k) for caption in captions]
        out = []
        for caption in captions:
            candidates = swap_attribute(caption, self.swap_groups or {}, self._rng)
            candidates += exchange_within(caption, self.exchange_groups, self._rng)
            out.append(candidates if k is None or len(candidates) <= k else self._rng.sample(candidates, k))
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # CLIP sec. 2.5: clip the temperature so logits stay ≤ 100× the cosine
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    # -- validation --------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "caption": [], "labels": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_features, text_features = self.encode(batch["image"], batch["caption"])
        scale = self.logit_scale.exp()
        loss = ClipLoss()(image_features, text_features, scale)  # within this rank's batch: sizes may differ
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))
        self._val["image"].append(image_features.float())
        self._val["text"].append(text_features.float())
        self._val["caption"].append(caption_ids(batch["caption"]).to(self.device))
        if self.zero_shot_prompts is not None:
            labels = self._benchmark.zero_shot_labels(batch["meta"], self.zero_shot_prompts.classes)
            self._val["labels"].append(labels.to(self.device))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val.get("image"):
            return
        gathered = {k: self._gather(torch.cat(v)) for k, v in self._val.items() if v}
        self._val = {}
        images, texts, groups = gathered["image"], gathered["text"], gathered["caption"]
        metrics = {}
        for k, r in retrieval_recall(texts, images, groups, groups).items():
            metrics[f"val/recall_t2i@{k}"] = r
        for k, r in retrieval_recall(images, texts, groups, groups).items():
            metrics[f"val/recall_i2t@{k}"] = r
        if "labels" in gathered:
            metrics.update(self._zero_shot(images, gathered["labels"]))
        self.log_dict(metrics, rank_zero_only=False)

    def _zero_shot(self, image_features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        single = (labels >= 0).all(dim=1)
        if not bool(single.any()):
            return {}
        predictions = zero_shot_predictions(self.text, image_features[single], self.zero_shot_prompts)
        out = {}
        for mode, predicted in predictions.items():
            suffix = "" if mode == "joint" else f"_{mode}"
            for a, attr in enumerate(self.zero_shot_prompts.classes):
                out[f"val/zeroshot_{attr}{suffix}"] = (predicted[:, a] == labels[single, a]).float().mean().item()
        return out

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of ``x`` concatenated (ranks may hold different row counts)."""
        if self._trainer is None or self._trainer.world_size <= 1:
            return x
        sizes = self.all_gather(torch.tensor(x.shape[0], device=x.device)).flatten().tolist()
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        everything = self.all_gather(padded)
        return torch.cat([everything[r, :n] for r, n in enumerate(sizes)])

    # -- export ------------------------------------------------------------------------------------------
    def exporter(self, datamodule: pl.LightningDataModule | None) -> Callable[[Path], None]:
        """The frozen text conditioner part, with the image tower inside it as ``image_encoder/`` (both
        ``config.json`` + ``model.safetensors`` parts, for CLIP score / FD in its embedding space)."""
        text = CLIPTextConditioner(self.text.config)
        text.load_state_dict(self.text.state_dict())

        def write(out: Path) -> None:
            save_part(text, out)
            save_part(self.image, out / IMAGE_ENCODER_DIR)

        return write
