"""Classifier guidance: labels in the latent cache, the noisy-latent classifier, its training module and export, and
the guidance wrapper (exact ε-shift in every prediction type; guidance towards y raises p(y) of the result)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from tiny_parts import tiny_pipeline, tiny_text_encoder, tiny_vae

from ldm.data.latents import LatentDataModule, LatentDataset, build_latent_cache, label_at, parse_label_paths
from ldm.data.shapes import BENCHMARK
from ldm.diffusion.guidance import classifier_guidance, shift_eps
from ldm.diffusion.objectives import predict_x0_eps, training_target
from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.errors import UsageError
from ldm.generation import load_classifier
from ldm.io import load_part, save_part
from ldm.models.checkpoint import rebuild_from_checkpoint
from ldm.models.latent_classifier import LatentClassifierModule
from ldm.modules.latent_classifier import LatentClassifier, LatentClassifierConfig

SCHEDULE = DiscreteSchedule(ScheduleConfig(name="scaled_linear"))
LABELS = {"color": ["red", "green", "blue"], "size": ["small", "large"]}


def tiny_classifier(seed: int = 0, resolution: int = 4) -> LatentClassifier:
    torch.manual_seed(seed)
    return LatentClassifier(LatentClassifierConfig(in_channels=4, resolution=resolution, width=16, hidden=32,
                                                   num_groups=8, labels=LABELS))


@pytest.fixture(scope="module")
def labelled_cache(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    build_latent_cache(tiny_vae(), tiny_text_encoder(), shapes_dir, out, 32, batch_size=64, progress=False,
                       labels=BENCHMARK.label_paths())
    return out


def test_label_paths_read_json_values():
    meta = {"objects": [{"color": "red", "n": 3}], "background": "teal", "pair": [{"c": "a"}, {"c": "b"}]}
    assert label_at(meta, "objects.only.color") == "red"
    assert label_at(meta, "objects.0.n") == "3"
    assert label_at(meta, "pair.-1.c") == "b"
    assert label_at(meta, "pair.only.c") is None          # two elements: no single value
    assert label_at(meta, "objects.0") is None            # an object is not a value
    assert label_at(meta, "missing.x") is None and label_at(meta, "pair.5.c") is None
    assert parse_label_paths("color=objects.only.color, bg=background") == {"color": "objects.only.color",
                                                                             "bg": "background"}
    assert parse_label_paths("none") == {}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_label_paths("color")


def test_cache_stores_the_labels_of_each_sample(labelled_cache, shapes_dir):
    from ldm.data.shards import list_shards, read_shard

    info = json.loads((labelled_cache / "info.json").read_text())
    assert set(info["labels"]) == {"color", "shape", "position", "size", "background"}
    data = LatentDataset(labelled_cache, "val")
    metas = [json.loads(files["json"]) for url in list_shards(shapes_dir, "val") for _, files in read_shard(url)]
    assert len(metas) == len(data) == 64
    names = list(data.label_classes)
    for i, meta in enumerate(metas):
        for a, name in enumerate(names):
            value = label_at(meta, BENCHMARK.label_paths()[name])
            got = data.labels[i, a].item()
            assert (got == -1) if value is None else data.label_classes[name][got] == value
    assert (data.labels[:, names.index("color")] == -1).any()      # two-object scenes have no single colour
    assert (data.labels[:, names.index("background")] >= 0).all()
    batch = data.__getitems__([0, 5])
    assert torch.equal(batch["labels"], data.labels[[0, 5]])


def test_log_prob_is_the_sum_of_the_labelled_heads():
    clf = tiny_classifier()
    z, t = torch.randn(3, 4, 4, 4), torch.tensor([0.0, 300.0, 999.0])
    targets = clf.targets([{"color": "green"}, {"color": "blue", "size": "large"}, {}])
    logits = clf(z, t)
    expected = torch.stack([
        logits["color"].log_softmax(1)[0, 1],
        logits["color"].log_softmax(1)[1, 2] + logits["size"].log_softmax(1)[1, 1],
        torch.tensor(0.0)])
    torch.testing.assert_close(clf.log_prob(z, t, targets), expected)
    with pytest.raises(ValueError, match="not one of its classes"):
        clf.targets({"color": "purple"})
    with pytest.raises(ValueError, match="has no label"):
        clf.targets({"shape": "star"})


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_shifted_output_implies_the_shifted_eps_in_every_prediction_type(kind):
    gen = torch.Generator().manual_seed(0)
    x, x0, eps, delta = (torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([100.0, 700.0], dtype=torch.float64)
    alpha, sigma = SCHEDULE.alpha_sigma(t, like=x)
    out = training_target(x0, eps, alpha, sigma, kind)
    x = alpha * x0 + sigma * eps
    new_x0, new_eps = predict_x0_eps(shift_eps(out, x, alpha, sigma, delta, kind), x, alpha, sigma, kind)
    torch.testing.assert_close(new_eps, eps + delta)
    torch.testing.assert_close(new_x0, (x - sigma * (eps + delta)) / alpha)


def test_classifier_guidance_shifts_eps_by_minus_s_sigma_grad():
    """log p(y | x) = −‖x − μ‖²/2 has gradient μ − x: ε̂' = ε̂ − s σ_t (μ − x) exactly (Dhariwal & Nichol Alg. 2)."""
    mu = torch.full((1, 4, 2, 2), 0.5, dtype=torch.float64)
    model = lambda x, t: 0.3 * x  # noqa: E731 - an ε-model
    guided = classifier_guidance(model, lambda x, t: -0.5 * (x - mu).pow(2).flatten(1).sum(1), 2.0, SCHEDULE)
    x, t = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([10.0, 500.0, 990.0], dtype=torch.float64)
    _, sigma = SCHEDULE.alpha_sigma(t, like=x)
    torch.testing.assert_close(guided(x, t), 0.3 * x - 2.0 * sigma * (mu - x))
    assert classifier_guidance(model, None, 0.0, SCHEDULE) is model
    with pytest.raises(ValueError, match=">= 0"):
        classifier_guidance(model, None, -1.0, SCHEDULE)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler-a"])
def test_guidance_towards_a_class_raises_its_probability(sampler):
    pipe = tiny_pipeline()
    clf = tiny_classifier(resolution=4)  # tiny_pipeline: 16 px images, VAE factor 4
    with torch.no_grad():  # a confident classifier (random init gives near-uniform, flat logits)
        for p in clf.heads.parameters():
            p.mul_(30)
    captured = {}

    def last_latent(info):
        captured["x0"] = info["x0"]

    t0 = torch.zeros(8)
    for target in ("red", "blue"):
        probs = []
        for scale in (0.0, 3.0):
            pipe.generate(["a shape"] * 8, steps=6, sampler=sampler, seed=1, progress=False, classifier=clf,
                          classifier_scale=scale, classifier_labels={"color": target}, callback=last_latent)
            logits = clf(captured["x0"].float(), t0)["color"]
            probs.append(logits.softmax(1)[:, LABELS["color"].index(target)])
        assert (probs[1] > probs[0]).all(), (target, probs)
        assert probs[1].mean() > probs[0].mean() + 0.15


def test_pipeline_checks_classifier_requests():
    pipe = tiny_pipeline()
    with pytest.raises(UsageError, match="needs labels"):
        pipe.generate(["a"], steps=1, progress=False, classifier=tiny_classifier(), classifier_scale=1.0)
    with pytest.raises(UsageError, match="not one of its classes"):
        pipe.generate(["a"], steps=1, progress=False, classifier=tiny_classifier(), classifier_scale=1.0,
                      classifier_labels={"color": "mauve"})
    with pytest.raises(UsageError, match="latents"):
        pipe.generate(["a"], steps=1, progress=False, classifier=tiny_classifier(resolution=8), classifier_scale=1.0,
                      classifier_labels={"color": "red"})
    with pytest.raises(UsageError, match="needs a classifier"):
        pipe.generate(["a"], steps=1, progress=False, classifier_scale=1.0)


def test_training_module_trains_exports_and_rebuilds(labelled_cache, tmp_path):
    model = LatentClassifierModule(classifier={"width": 16, "hidden": 32, "num_groups": 8},
                                   optimizer={"lr": 3e-3}, lr_schedule={"warmup_steps": 0, "decay": "constant"})
    dm = LatentDataModule(str(labelled_cache), batch_size=32)
    trainer = pl.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=6,
                         num_sanity_val_steps=0)
    trainer.fit(model, dm)
    spec = model.hparams.classifier
    assert spec["resolution"] == 8 and spec["labels"]["shape"] == ["circle", "diamond", "square", "star", "triangle"]
    assert trainer.callback_metrics["val/loss"] > 0
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    rebuilt, _, _ = rebuild_from_checkpoint(ckpt)
    out = rebuilt.export(tmp_path / "part")
    loaded = load_part(out, kind="classifier")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0])
    torch.testing.assert_close(loaded(z, t)["color"], model.classifier.eval()(z, t)["color"])
    meta = json.loads((out / "config.json").read_text())
    assert meta["_trained_with"]["vae"] == json.loads((labelled_cache / "info.json").read_text())["parts"]["vae"]


def test_a_classifier_of_another_vae_is_refused(tmp_path):
    pipe = tiny_pipeline()
    save_part(pipe.vae, tmp_path / "vae")          # gives the pipeline's VAE a weight hash
    save_part(tiny_classifier(), tmp_path / "clf", {"_trained_with": {"vae": "0" * 64}})
    with pytest.raises(UsageError, match="another VAE"):
        load_classifier(tmp_path / "clf", pipe)
