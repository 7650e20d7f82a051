"""Contrastive CLIP LightningModule: losses (also under a 2-process gloo group), hard negatives, metrics, export."""

from __future__ import annotations

import math
import os
import random
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TINY_TEXT = {"context_length": 24, "width": 16, "heads": 2, "layers": 1, "embed_dim": 16}
TINY_IMAGE = {"tower": "conv", "width": 16, "layers": 3, "embed_dim": 16}


def tiny_module(**kwargs):
    from ldm.models.text_encoder import ContrastiveCLIP

    torch.manual_seed(0)
    return ContrastiveCLIP(text=TINY_TEXT, image=TINY_IMAGE, **kwargs)


def shapes_batches(n: int, batch_size: int, split: str = "train") -> list[dict]:
    import numpy as np

    from ldm.data import shapes

    samples = [shapes.make_sample(shapes.sample_rng(0, split, i), 32) for i in range(n)]
    out = []
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        image = torch.from_numpy(np.stack([np.asarray(s[0]) for s in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append({"image": image, "caption": [s[1] for s in chunk], "meta": [s[2] for s in chunk],
                    "key": [f"{split}{start + i}" for i in range(len(chunk))]})
    return out


# ------------------------------------------------------------------------------------------------ losses


def test_aligned_embeddings_score_lower_than_shuffled():
    from ldm.models.text_encoder import make_clip_loss

    torch.manual_seed(0)
    images = F.normalize(torch.randn(16, 8), dim=-1)
    texts = F.normalize(images + 0.1 * torch.randn(16, 8), dim=-1)
    loss = make_clip_loss()
    aligned = loss(images, texts, torch.tensor(10.0))
    shuffled = loss(images, texts[torch.randperm(16)], torch.tensor(10.0))
    assert aligned < 0.1 < math.log(16) - 1 < shuffled


def test_hard_negative_loss_is_pairwise_cross_entropy():
    from ldm.models.text_encoder import hard_negative_loss

    e = torch.eye(4)
    images, texts = e[:2], e[:2]
    negatives = torch.stack([e[2], e[0], e[3]])  # caption 0 gets 2 negatives (one orthogonal, one = image 0)
    owner = torch.tensor([0, 0, 1])
    loss = hard_negative_loss(images, texts, negatives, owner, torch.tensor(5.0))
    # pairs: (cos 1 vs 0), (1 vs 1), (1 vs 0): CE = log(1+e^-5), log 2, log(1+e^-5)
    expected = (2 * math.log1p(math.exp(-5)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_swap_attribute_gives_grammatical_one_word_negatives():
    from ldm.data.shapes import BENCHMARK
    from ldm.models.text_encoder import swap_attribute

    groups = BENCHMARK.hard_negative_groups()
    caption = "a small red circle in the top left"
    negatives = swap_attribute(caption, groups, random.Random(0))
    assert len(negatives) == 3  # colour, shape, position phrase
    for negative in negatives:
        changed = [w for w in negative.split() if w not in caption.split()]
        assert negative != caption and 1 <= len(changed) <= 3
    assert swap_attribute("an orange star", {"color": ["orange", "red"]}, random.Random(0)) == ["a red star"]
    assert swap_attribute("a red star", {"color": ["orange", "red"]}, random.Random(0)) == ["an orange star"]
    relation = swap_attribute("a red circle left of a blue square", {"relation": ["left of", "above"],
                                                                      "position": ["left", "top"]}, random.Random(0))
    assert relation == ["a red circle above a blue square"]  # "left" inside "left of" is not a position
    assert swap_attribute("a photo of a cat", groups, random.Random(0)) == []


GROUPS = {"color": ["red", "orange", "blue", "green"], "shape": ["circle", "star", "square"],
          "position_phrase": ["in the top left", "on the right", "at the top"],
          "position": ["top left", "right", "top"]}


def _exchanged(caption: str, negative: str) -> list[tuple[str, str]]:
    """The (caption word, negative word) pairs where two captions differ, articles aside."""
    def words(text):
        return [w for w in text.split() if w not in ("a", "an")]

    a, b = words(caption), words(negative)
    assert len(a) == len(b), (caption, negative)
    return [(x, y) for x, y in zip(a, b) if x != y]


def test_exchange_within_swaps_two_members_of_one_group_and_keeps_the_bag_of_words():
    from ldm.models.text_encoder import exchange_within

    caption = "a small orange star in the top left and a large red circle on the right"
    assert exchange_within(caption, GROUPS, random.Random(0)) == [
        "a small red star in the top left and a large orange circle on the right",
        "a small orange circle in the top left and a large red star on the right",
        "a small orange star on the right and a large red circle in the top left"]
    # the article follows the word now after it; the bag of words is the caption's
    assert exchange_within("an orange circle left of a red square", GROUPS, random.Random(0)) == [
        "a red circle left of an orange square", "an orange square left of a red circle"]
    for negative in exchange_within(caption, GROUPS, random.Random(1)):
        assert sorted(negative.split()) == sorted(caption.split())
    # a group named once, or twice with the same word, gives no exchange; three colours: one random pair
    assert exchange_within("a large red circle on the right", GROUPS, random.Random(0)) == []
    assert exchange_within("a red star above a blue star", GROUPS, random.Random(0)) == ["a blue star above a red star"]
    three = {exchange_within("red, green and blue", GROUPS, random.Random(seed))[0] for seed in range(20)}
    assert three == {"green, red and blue", "blue, green and red", "red, blue and green"}


def test_swaps_and_exchanges_together_give_per_caption_negatives_of_one_changed_binding():
    """Each negative differs from its caption in exactly the intended attribute: a shape or relation replaced by
    another member of its group, or two colours / shapes / places exchanged between the objects."""
    swap = {"shape": GROUPS["shape"], "relation": ["left of", "right of", "above", "below"]}
    module = tiny_module(hard_negatives=swap, exchange_negatives=GROUPS, hard_negatives_per_caption=2)
    captions = ["a large red circle on the right", "a red circle left of a blue square",
                "a small orange star in the top left and a large red circle on the right"]
    random.seed(0)
    kinds = set()
    for _ in range(10):
        for caption, negatives in zip(captions, module._hard_negatives(captions)):
            assert len(negatives) == (1 if caption == captions[0] else 2) and len(set(negatives)) == len(negatives)
            for negative in negatives:
                if negative in [caption.replace("left of", r) for r in swap["relation"] if r != "left of"]:
                    kinds.add("relation swap")
                    assert caption == captions[1]
                    continue
                differ = _exchanged(caption, negative)
                if len(differ) == 1:  # one shape word replaced by another
                    kinds.add("shape swap")
                    assert differ[0][0] in swap["shape"] and differ[0][1] in swap["shape"]
                else:  # two words of one group exchanged (or two position phrases: compare as text)
                    kinds.add("exchange")
                    assert sorted(negative.split()) == sorted(caption.split())
                    phrases = [p for p in GROUPS["position_phrase"] if p in caption]
                    if len(phrases) == 2:
                        a, b = phrases
                        swapped = caption.replace(a, "\0").replace(b, a).replace("\0", b)
                        if negative == swapped:
                            continue
                    (x, y), (y2, x2) = differ
                    assert (x, y) == (x2, y2) and any({x, y} <= set(g) for g in GROUPS.values())
    assert kinds == {"shape swap", "exchange", "relation swap"}


def test_retrieval_recall_counts_duplicate_captions_as_hits():
    from ldm.models.text_encoder import caption_ids, retrieval_recall

    groups = caption_ids(["a", "b", "a", "c"])
    assert groups[0] == groups[2] and groups[0] != groups[1]
    images = torch.eye(4)
    texts = torch.eye(4)[[2, 1, 0, 3]]  # text 0 nearest image 2, which has the same caption "a"
    assert retrieval_recall(texts, images, groups, groups) == {1: 1.0, 5: 1.0}
    texts = torch.eye(4)[[1, 0, 3, 2]]
    assert retrieval_recall(texts, images, groups, groups, ks=(1, 2)) == {1: 0.0, 2: 0.5}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, loss_file: str, flags: dict) -> None:
    import importlib.util

    import torch.distributed as dist

    # open_clip's loss.py loaded on its own: importing the open_clip package would cost each process seconds
    spec = importlib.util.spec_from_file_location("open_clip_loss", loss_file)
    open_clip_loss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(open_clip_loss)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, texts, scale = _ddp_inputs()
        n = images.shape[0] // world
        local_images = images[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        local_texts = texts[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = open_clip_loss.ClipLoss(rank=rank, world_size=world, **flags)(local_images, local_texts, scale)
        loss.backward()
        torch.save({"loss": loss.detach(), "images": local_images.grad, "texts": local_texts.grad,
                    "scale": scale.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_inputs():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(8, 6, generator=g), dim=-1)
    return images, texts, torch.tensor(7.0, requires_grad=True)


def test_clip_loss_under_two_process_gloo_equals_single_process(tmp_path):
    import inspect

    import open_clip.loss
    import torch.multiprocessing as mp

    from ldm.models.text_encoder import make_clip_loss

    configured = make_clip_loss(rank=1, world_size=2)  # the module's DDP configuration, run by each worker
    assert isinstance(configured, open_clip.loss.ClipLoss) and (configured.rank, configured.world_size) == (1, 2)
    flags = {"local_loss": configured.local_loss, "gather_with_grad": configured.gather_with_grad}
    assert flags == {"local_loss": True, "gather_with_grad": True}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loss_file = inspect.getsourcefile(open_clip.loss)
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), loss_file, flags), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    images, texts, scale = _ddp_inputs()
    images.requires_grad_(True)
    texts.requires_grad_(True)
    reference = make_clip_loss()(images, texts, scale)
    reference.backward()
    # DDP averages over ranks: mean of the local losses and of the gradients = the single-process ones
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([r["images"] for r in ranks]) / 2, images.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([r["texts"] for r in ranks]) / 2, texts.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([r["scale"] for r in ranks]).mean(), scale.grad, rtol=1e-5, atol=1e-7)
    assert abs(ranks[0]["loss"].item() - ranks[1]["loss"].item()) > 1e-4  # each rank really scored its own rows


# ------------------------------------------------------------------------------------------- training


def test_few_steps_on_a_fixed_batch_reduce_the_loss():
    module = tiny_module(optimizer={"lr": 3e-3}, hard_negatives="shapes")
    batch = shapes_batches(32, 32)[0]
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        for _ in range(12):
            loss = module.training_step(batch, 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_shapes_config_gives_every_caption_all_its_negatives():
    """configs/clip/shapes.yaml: a one-object caption gets its shape swap; a relation caption all four of its
    negatives (shape swap, relation swap, colours exchanged, shapes exchanged), not one drawn among them."""
    import re

    import yaml

    from ldm.data.shapes import RELATIONS, SHAPES

    config = Path(__file__).parents[1] / "configs" / "clip" / "shapes.yaml"
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    module = tiny_module(**{k: init[k] for k in ("hard_negatives", "hard_negative_weight", "hard_negatives_per_caption",
                                                 "exchange_negatives")})
    captions = ["a large red circle on the left", "a small blue star at the top, on a gray background",
                "a red circle left of a blue square"]
    random.seed(3)
    single_a, single_b, pair = module._hard_negatives(captions)
    pattern = "|".join(SHAPES)
    for caption, negatives in zip(captions, (single_a, single_b)):
        (negative,) = negatives
        shape, other = re.search(pattern, caption).group(), re.search(pattern, negative).group()
        assert other != shape and negative == caption.replace(shape, other)
    assert len(pair) == 4
    shape_swap, relation_swap = pair[0], pair[1]
    assert re.fullmatch(rf"a red ({pattern}) left of a blue square", shape_swap) and "circle" not in shape_swap
    assert relation_swap in {captions[2].replace("left of", r) for r in RELATIONS if r != "left of"}
    assert pair[2:] == ["a blue circle left of a red square", "a red square left of a blue circle"]


def test_logit_scale_is_clamped_at_ln_100():
    module = tiny_module()
    assert module.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        module.logit_scale.fill_(9.0)
    module.on_train_batch_end(None, None, 0)
    assert module.logit_scale.item() == pytest.approx(math.log(100))


def test_fit_logs_metrics_checkpoint_loads_safely_and_export_round_trips(tmp_path):
    import pytorch_lightning as pl

    from ldm.io import load_checkpoint, load_part
    from ldm.models.text_encoder import ContrastiveCLIP
    from ldm.modules.text_encoder import CLIPImageEncoder, CLIPTextConditioner

    module = tiny_module(hard_negatives="shapes", lr_schedule={"warmup_steps": 2}, zero_shot="shapes")
    from torch.utils.data import DataLoader

    train = DataLoader(shapes_batches(48, 16), batch_size=None)
    val = DataLoader(shapes_batches(40, 20, "val"), batch_size=None)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/clip_loss", "train/hard_negative_loss", "train/logit_scale", "val/loss",
                 "val/recall_t2i@1", "val/recall_t2i@5", "val/recall_i2t@1", "val/recall_i2t@5",
                 "val/zeroshot_color", "val/zeroshot_shape", "val/zeroshot_position"):
        assert name in metrics, name
        assert math.isfinite(float(metrics[name]))
    assert 0 <= float(metrics["val/recall_i2t@1"]) <= float(metrics["val/recall_i2t@5"]) <= 1

    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    ckpt = load_checkpoint(ckpt_path)  # weights_only=True: hyper-parameters are plain values
    restored = ContrastiveCLIP(**ckpt["hyper_parameters"])
    restored.load_state_dict(ckpt["state_dict"])

    out = restored.export(tmp_path / "text_encoder")
    text, image = load_part(out, CLIPTextConditioner), load_part(out / "image_encoder", CLIPImageEncoder)
    module.eval()
    module.text.freeze()  # same kernels as the exported part (MultiheadAttention's fast path needs no-grad)
    prompts = ["a small red circle in the top left", ""]
    with torch.no_grad():
        expected = module.text(*module.text.tokenize(prompts))
        images = next(iter(val))["image"][:4]
        assert torch.equal(image(images), module.image(images))
    for a, b in zip(text.encode_text(prompts), expected):
        assert torch.equal(a, b)
    assert text.frozen and text.context_length == 24
