"""Evaluation metrics: Fréchet distance (closed forms, scipy parity), KID, CLIP score, the real-feature cache,
the shapes adherence selection, and `ldm fid` end to end on a tiny random pipeline (single run and sweep)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_parts import random_inception, tiny_image_encoder, tiny_pipeline_dir, tiny_text_encoder

from ldm.cli import main as ldm_main
from ldm.evaluation import fid
from ldm.evaluation.sweep import adherence_targets, model_evaluations, sweep_grid
from ldm.io import PartError


def with_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    """n samples whose sample mean and (unbiased) sample covariance are exactly ``mean`` and ``cov``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # whiten: sample cov = I
    return torch.from_numpy(x @ np.linalg.cholesky(cov).T + mean)


def closed_form_fd(m1, c1, m2, c2) -> float:
    from scipy.linalg import sqrtm

    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(sqrtm(c1 @ c2))))


# ---------------------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.1 * np.eye(d)  # full, non-commuting covariances
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    x, y = with_moments(300, m1, c1, 1), with_moments(200, m2, c2, 2)
    assert fid.frechet_distance(x, y) == pytest.approx(closed_form_fd(m1, c1, m2, c2), rel=1e-6)
    # diagonal covariances commute: d² = ‖Δμ‖² + Σ (√a − √b)²
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    x, y = with_moments(100, np.zeros(3), np.diag(v1), 3), with_moments(100, np.ones(3), np.diag(v2), 4)
    expected = 3.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid.frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_zero_for_identical_sets_symmetric_and_grows_with_a_shift():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(fid.frechet_distance(x, x)) < 1e-6
    y = torch.randn(400, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    assert fid.frechet_distance(x, y) == pytest.approx(fid.frechet_distance(y, x), rel=1e-9)
    shifts = [0.1, 0.5, 1.0, 2.0]
    values = [fid.frechet_distance(x, x + s) for s in shifts]
    for s, v in zip(shifts, values):  # same covariance: only the mean term, ‖s·1‖² = 16 s²
        assert v == pytest.approx(16 * s * s, rel=1e-6, abs=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_large_for_a_shifted_one():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same, same_std = fid.kernel_inception_distance(x, y, subset_size=100, subsets=20)
    shifted, _ = fid.kernel_inception_distance(x, y + 1.0, subset_size=100, subsets=20)
    assert abs(same) < 0.02 and same_std > 0 and shifted > 0.5
    assert fid.kernel_inception_distance(x, y, 100, 20, seed=3) == fid.kernel_inception_distance(x, y, 100, 20, seed=3)


# ------------------------------------------------------------------------------------- CLIP space, score
def test_clip_features_are_scaled_unit_embeddings_and_clip_score_is_the_cosine():
    encoder, text = tiny_image_encoder(), tiny_text_encoder()
    extractor = fid.CLIPImageFeatures(encoder)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embed = encoder(images.float() / 127.5 - 1)
    features = fid.extract_features(extractor.train(), images, batch_size=2)  # stays in eval mode
    assert not extractor.training
    torch.testing.assert_close(features, (F.normalize(embed, dim=-1) * 32 ** 0.5).double(), rtol=1e-5, atol=1e-5)
    prompts = ["a red circle", "a blue star on the left", "", "green", "a large white square"]
    metric = fid.project_clip_score(text, encoder)
    score = fid.clip_score(metric, images, prompts, batch_size=2)
    ids, mask = text.tokenize(prompts)
    with torch.no_grad():
        cos = F.cosine_similarity(embed, text.pooled_embedding(ids, mask), dim=-1)
    assert float(metric.score / metric.n_samples) == pytest.approx(float(100 * cos.mean()), abs=1e-4)
    assert score == pytest.approx(max(0.0, float(100 * cos.mean())), abs=1e-4)


def test_clip_score_with_a_local_transformers_clip(tmp_path):
    from test_text_encoder import write_tiny_hf_folder
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tiny_hf_folder(tmp_path)  # tokenizer/ (+ a text model we do not use)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}), tokenizer=tok)
    torch.manual_seed(0)
    text_cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=12, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                      patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=16)).eval()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "blue", "red blue circle"]
    metric = fid.hf_clip_score(tmp_path / "clip")
    fid.clip_score(metric, images, prompts)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=tokens["input_ids"],
                                      attention_mask=tokens["attention_mask"]).pooler_output
    expected = float(100 * F.cosine_similarity(img, txt, dim=-1).mean())
    assert float(metric.score / metric.n_samples) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(PartError, match="--clip-score-model"):
        fid.hf_clip_score(tmp_path / "missing")


def test_missing_inception_weights_name_the_file_and_the_flag(tmp_path, capsys):
    with pytest.raises(PartError, match=r"--inception-weights.*weights-inception-2015-12-05-6726825d\.pth"):
        fid.inception_features(None)
    with pytest.raises(PartError, match="does not exist"):
        fid.inception_features(tmp_path / "nope.pth")
    code = ldm_main(["fid", "--pipeline", str(tmp_path / "no_pipeline"), "--features", "inception"])
    err = capsys.readouterr().err
    assert code == 2 and fid.INCEPTION_FILE in err and "--features clip" in err


# --------------------------------------------------------------------------- Inception-v3 (FID), offline
class NotATensor:
    """A picklable non-tensor object: torch.load(weights_only=True) must refuse a file that holds one."""


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, and its state dict saved as a .pth (no download)."""
    net = random_inception(0)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return net, path


def reference_features(net, images: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's own forward (TF1 bilinear resize to 299, pool3): the features FID is defined on."""
    with torch.no_grad():
        return net(images)[0].double()


def test_inception_features_come_from_the_given_file_and_match_torch_fidelity(inception, tmp_path):
    net, path = inception
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor = fid.inception_features(path)
    assert extractor.num_features == 2048 and fid.metric_name(extractor) == "fid" and not extractor.training
    features = fid.extract_features(extractor, images, batch_size=2)
    expected = reference_features(net, images)
    assert features.shape == (3, 2048) and expected.std() > 0.1  # the random net's features are not degenerate
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)
    # other weights in the file → other features and another cache identity
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["Mixed_7c.branch_pool.bn.running_mean"] += 0.5
    torch.save(state, tmp_path / "other.pth")
    other = fid.inception_features(tmp_path / "other.pth")
    assert (fid.extract_features(other, images) - features).abs().max() > 0.1
    assert fid.extractor_fingerprint(other) != fid.extractor_fingerprint(extractor)


def test_inception_weights_with_wrong_keys_shapes_or_objects_are_refused_naming_the_file(inception, tmp_path,
                                                                                         capsys):
    net, _ = inception
    wrong_shape = {k: v.clone() for k, v in net.state_dict().items()}
    wrong_shape["fc.weight"] = torch.zeros(10, 2048)
    files = {"wrong_shape.pth": (wrong_shape, r"size mismatch for fc\.weight"),
             "wrong_keys.pth": ({"fc.w": torch.zeros(1008, 2048)}, r"Missing key"),
             "object.pth": ({"fc.weight": torch.zeros(1), "x": NotATensor()}, r"weights_only=True.*Unsupported global"),
             "tensor.pth": (torch.zeros(3), r"holds a Tensor, not a state dict")}
    for name, (content, reason) in files.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(PartError, match=re.escape(str(tmp_path / name)) + ".*" + reason):
            fid.inception_features(tmp_path / name)
    # through the CLI: exit code 2 and the message, before any pipeline is loaded
    code = ldm_main(["fid", "--pipeline", str(tmp_path / "no_pipeline"), "--features", "inception",
                     "--inception-weights", str(tmp_path / "wrong_keys.pth")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "wrong_keys.pth") in err and fid.INCEPTION_FILE in err


def nuclear_fd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Closed-form FD for n < d (Heusel et al. 2017, eq. 6): with centred features A, B and Σ = AᵀA / (n − 1),
    the non-zero eigenvalues of Σ_x Σ_y are those of (A Bᵀ)(B Aᵀ) / ((n_x − 1)(n_y − 1)), so
    Tr (Σ_x Σ_y)^{1/2} is the nuclear norm of A Bᵀ / √((n_x − 1)(n_y − 1))."""
    a, b = x - x.mean(0), y - y.mean(0)
    nx, ny = len(x) - 1, len(y) - 1
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum() / (nx * ny) ** 0.5
    return float((x.mean(0) - y.mean(0)).square().sum() + a.square().sum() / nx + b.square().sum() / ny
                 - 2 * trace_sqrt)


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """KID's statistic (Bińkowski et al. 2018, sec. 4): unbiased MMD² of two sets, k(x, y) = (xᵀy / d + 1)³."""
    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    def within(a):
        return (kernel(a, a).sum() - kernel(a, a).diagonal().sum()) / (len(a) * (len(a) - 1))

    return float(within(x) + within(y) - 2 * kernel(x, y).mean())


def test_fid_command_with_inception_weights_computes_fid_on_the_files_features(inception, tmp_path, shapes_dir):
    from safetensors.torch import load_file

    from ldm.evaluation.sweep import generate_for
    from ldm.pipeline import TextToImagePipeline

    net, path = inception
    pipe_dir, cache, out = tiny_pipeline_dir(tmp_path / "pipe"), tmp_path / "cache", tmp_path / "fid.json"
    assert ldm_main(["fid", "--pipeline", str(pipe_dir), "--data", str(shapes_dir), "--n", "4", "--steps", "1",
                     "--features", "inception", "--inception-weights", str(path), "--no-references",
                     "--probe", str(tmp_path / "probe"), "--probe-steps", "5", "--cache-dir", str(cache),
                     "--batch-size", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["metric"] == "fid" and r["features"] == "inception" and "fd_clip" not in r and r["n"] == 4
    assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["kid"]) and np.isfinite(r["kid_std"])
    # the cached real features are torch-fidelity's forward of the real images with the file's weights
    real = fid.load_split(shapes_dir, "val", 4, 16)
    (cached,) = cache.glob("val-fid-n4-*.safetensors")
    real_features = reference_features(net, real.images)
    torch.testing.assert_close(load_file(str(cached))["features"], real_features, rtol=1e-6, atol=1e-6)
    # and the reported FID is the Fréchet distance between them and the generated images' features
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    images, _ = generate_for(pipe, real.captions, r["sampler"], 1, r["guidance"], seed=0, batch_size=4)
    fake_features = reference_features(net, images)
    assert r["fid"] == pytest.approx(nuclear_fd(real_features, fake_features), rel=1e-4)
    # KID's subsets of min(1000, n) = 4 samples are the whole sets: every subset gives the full unbiased MMD²
    assert r["kid"] == pytest.approx(unbiased_mmd2(real_features, fake_features), rel=1e-6)


# -------------------------------------------------------------------------------------- real data, cache
def test_real_feature_cache_is_keyed_by_data_split_size_n_and_extractor(tmp_path, shapes_dir):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cache = tmp_path / "cache"
    extractor = fid.CLIPImageFeatures(tiny_image_encoder(0))
    calls = []

    def get(ext=extractor, split="val", size=16, n=8):
        def compute():
            calls.append(1)
            return fid.extract_features(ext, fid.load_split(data, split, n, size).images)
        return fid.cached_features(fid.real_cache_key(data, split, size, n, ext), cache, compute)

    first, hit = get()
    assert not hit and first.shape == (8, 32)
    again, hit = get()
    assert hit and torch.equal(first, again) and len(calls) == 1
    other_weights = fid.CLIPImageFeatures(tiny_image_encoder(1))
    for changed in (dict(split="train"), dict(size=32), dict(n=9), dict(ext=other_weights)):
        assert not get(**changed)[1], changed
    shard = sorted((data / "val").glob("*.tar"))[0]
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the data was rewritten
    assert not get()[1]
    assert get()[1]


def test_adherence_uses_single_object_captions_that_name_colour_shape_and_position(shapes_dir):
    from ldm.data.shapes import PHRASES

    real = fid.load_split(shapes_dir, "val", 64, 32)
    index, targets = adherence_targets(real.metas)
    assert 10 < len(index) < 64
    for i, meta in enumerate(real.metas):
        caption, objects = real.captions[i], meta["objects"]
        names_all = len(objects) == 1 and objects[0]["color"] in caption and objects[0]["shape"] in caption and (
            PHRASES[objects[0]["position"]] in caption or f", {objects[0]['position']}," in caption)
        assert (i in index) == names_all, caption
    assert targets[0] == {k: real.metas[index[0]]["objects"][0][k] for k in ("color", "shape", "position")}


def test_sweep_grid_and_model_evaluations():
    grid = sweep_grid({"sampler": ["ddim", "heun"], "steps": [5, 10], "guidance": [1.0]})
    assert [(g["sampler"], g["steps"]) for g in grid] == [("ddim", 5), ("ddim", 10), ("heun", 5), ("heun", 10)]
    assert model_evaluations("heun", 10) == 19 and model_evaluations("ddim", 10) == 10
    with pytest.raises(ValueError, match="--sweep"):
        sweep_grid({"sampler": ["ddim"], "steps": [1], "guidance": [1.0], "eta": [0.5]})


# ------------------------------------------------------------------------------------------ `ldm fid`
def test_fid_command_writes_json_and_reuses_the_real_statistics(tmp_path, shapes_dir):
    pipe = tiny_pipeline_dir(tmp_path / "pipe")
    args = ["fid", "--pipeline", str(pipe), "--data", str(shapes_dir), "--n", "32", "--steps", "2",
            "--probe", str(tmp_path / "probe"), "--probe-steps", "5", "--cache-dir", str(tmp_path / "cache"),
            "--batch-size", "16", "--out", str(tmp_path / "r1.json")]
    assert ldm_main(args) == 0
    r = json.loads((tmp_path / "r1.json").read_text())
    assert r["metric"] == "fd_clip" and "fid" not in r and r["n"] == 32 and r["steps"] == 2
    assert r["sampler"] == "dpmpp-2m" and r["guidance"] == 4.0 and r["seed"] == 0 and r["wall_seconds"] > 0
    assert len(r["pipeline_hash"]) == 64 and r["real_features_cached"] is False
    assert r["fd_clip"] > 0 and np.isfinite(r["kid_clip"]) and 0 <= r["clip_score"] <= 100
    assert 0 < r["adherence_n"] < 32 and all(0 <= r[k] <= 1 for k in ("color", "shape", "position", "all_three"))
    refs = r["references"]
    assert set(refs) == {"fd_clip_train_vs_val", "fd_clip_vae_recon", "clip_score_real"}
    assert all(v >= 0 for v in refs.values())
    # same data, split, size, n and extractor: the real features come from the cache, the numbers are the same
    assert ldm_main(args[:-1] + [str(tmp_path / "r2.json")]) == 0
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["real_features_cached"] is True
    assert r2["fd_clip"] == pytest.approx(r["fd_clip"], rel=1e-9) and r2["references"] == pytest.approx(refs)


def test_fid_sweep_writes_csv_and_plots(tmp_path, shapes_dir):
    pipe = tiny_pipeline_dir(tmp_path / "pipe")
    out = tmp_path / "sweep" / "fid.json"
    assert ldm_main(["fid", "--pipeline", str(pipe), "--data", str(shapes_dir), "--n", "16", "--no-references",
                     "--probe", str(tmp_path / "probe"), "--probe-steps", "5", "--cache-dir", "",
                     "--sweep", "sampler=ddim,heun", "steps=1,2", "guidance=1,3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows[:3]] == [("ddim", "1", "1.0"), ("ddim", "1", "3.0"),
                                                                           ("ddim", "2", "1.0")]
    assert len(rows) == 8 and {r["nfe"] for r in rows if r["sampler"] == "heun"} == {"1", "3"}
    assert all(float(r["fd_clip"]) > 0 for r in rows)
    for name in ("fd_vs_guidance", "fd_vs_nfe"):
        assert (tmp_path / "sweep" / f"fid_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a random CLIP scores every image 0 (torchmetrics clamps the mean at 0): no trade-off curve to draw then
    assert (tmp_path / "sweep" / "fid_fd_vs_clip_score.png").is_file() == (len({r["clip_score"] for r in rows}) > 1)
    result = json.loads(out.read_text())
    assert len(result["results"]) == 8 and result["references"] == {}


def test_plot_sweep_draws_the_three_figures(tmp_path):
    from ldm.evaluation.sweep import plot_sweep

    rows = [{"sampler": s, "steps": st, "nfe": model_evaluations(s, st), "guidance": g, "n": 10,
             "fd_clip": 10 / st + g, "clip_score": 20 + g}
            for s in ("ddim", "heun") for st in (5, 10) for g in (1.0, 4.0)]
    paths = plot_sweep(rows, tmp_path / "p", {"fd_clip_train_vs_val": 1.0, "clip_score_real": 30.0})
    assert [p.name for p in paths] == ["p_fd_vs_guidance.png", "p_fd_vs_nfe.png", "p_fd_vs_clip_score.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_fid_without_an_image_encoder_says_which_flag_to_pass(tmp_path, shapes_dir, capsys):
    pipe = tiny_pipeline_dir(tmp_path / "pipe", with_image_encoder=False)
    assert ldm_main(["fid", "--pipeline", str(pipe), "--data", str(shapes_dir), "--n", "8"]) == 2
    assert "--image-encoder" in capsys.readouterr().err
