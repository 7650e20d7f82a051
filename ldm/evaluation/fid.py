"""How close generated images are to real ones: Fréchet distance, KID and CLIP score, offline.

* **FD** (Heusel et al. 2017, eq. 6): Gaussians fitted to the features of real and generated images,
  d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}). On Inception-v3 pool features it is **FID**
  (``fid``); on the image embeddings of the project's CLIP it is **FD in CLIP space** (``fd_clip``) — a
  different number, never called FID.
* **KID** (Bińkowski et al. 2018, sec. 4): unbiased MMD² with the kernel k(x, y) = (xᵀy / d + 1)³, averaged
  over random subsets (``kid`` / ``kid_clip``).
* **CLIP score** (Hessel et al. 2021, sec. 3): 100 · cosine similarity of an image and its prompt in a CLIP
  space (torchmetrics' convention: w = 100, the mean clamped at 0).

The Fréchet, MMD and CLIP-score arithmetic is torchmetrics' (``FrechetInceptionDistance``,
``KernelInceptionDistance``, ``CLIPScore``); this module supplies what they need offline: feature extractors
as torchmetrics ``feature=`` modules (uint8 images (B, 3, H, W) → (B, D), with ``num_features``), a local
Inception weight file, the project CLIP as a ``CLIPScore`` model, and a cache of real-image features keyed
by (data, split, size, n, extractor) so repeated runs only generate.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ldm.data.shards import list_shards
from ldm.errors import UsageError
from ldm.io import PartError, atomic_write_bytes, load_part, torch_load_safely
from ldm.modules.text_encoder import CLIPImageEncoder, CLIPTextConditioner

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FEATURES = ("clip", "inception")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------- images, features
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) → uint8 [0, 255], quantized exactly as saved PNGs (``ldm.pipeline.to_pil``)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class CLIPImageFeatures(nn.Module):
    """The project's CLIP image tower as a torchmetrics ``feature=`` module: uint8 images → features (B, E).

    With ``normalize`` (default) the features are √E · the L2-normalized embedding: the direction is what CLIP
    compares (CLIP fig. 3), so the FD does not drift with the embedding norm, and the √E scale gives each
    coordinate O(1) size like Inception's pool features, which KID's kernel (xᵀy / d + 1)³ assumes.
    Always in eval mode.
    """

    kind = "clip"
    metric_name = "fd_clip"
    transform = "sqrt(E) * l2-normalized embedding"  # part of the cache key: change it when forward changes

    def __init__(self, encoder: CLIPImageEncoder, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.normalize = normalize
        self.num_features = int(encoder.config.embed_dim)

    @classmethod
    def from_part(cls, path: str | Path, normalize: bool = True) -> CLIPImageFeatures:
        """Load an exported ``CLIPImageEncoder`` part; a missing folder names the flag and the training."""
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise PartError(f"no CLIP image encoder part in {path}: pass --image-encoder DIR (`make train-clip` "
                            "exports it to checkpoints/<data>/parts/text_encoder/image_encoder)")
        return cls(load_part(path, CLIPImageEncoder), normalize)

    def train(self, mode: bool = True) -> CLIPImageFeatures:
        return super().train(False)  # BatchNorm in the conv tower must keep its running statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
        param = next(self.encoder.parameters())
        features = self.encoder(x.to(param.device, param.dtype)).float()
        return F.normalize(features, dim=-1) * self.num_features ** 0.5 if self.normalize else features


def read_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception-v3 state dict in ``path``, read with ``torch.load(weights_only=True)``: a file that pickles
    anything but tensors (or is not a state dict) is refused with an error naming it."""
    try:
        state = torch_load_safely(path, "--inception-weights")
    except PartError as e:
        raise PartError(f"{e}. Pass torch-fidelity's {INCEPTION_FILE}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PartError(f"--inception-weights {path} holds a {type(state).__name__}, not a state dict of tensors; "
                        f"pass torch-fidelity's {INCEPTION_FILE}")
    return state


def inception_features(weights: str | Path | None, dims: int = 2048) -> nn.Module:
    """torchmetrics' FID Inception-v3 (torch-fidelity's port of the TF graph of Heusel et al. 2017), read from
    a local weight file; ``dims`` = 2048 is the pool3 coding layer FID uses (Heusel et al. 2017). Nothing is
    downloaded.

    Images are resized to 299 px with TF1's bilinear resize (``antialias=False``), as in the reference TF FID
    and torch-fidelity, so the features are those FID values in the literature are computed on (torchmetrics'
    default antialiased resize gives different ones). The file is read here with ``weights_only=True``;
    torch-fidelity's constructor, which unpickles without that guard, only sees the verified tensors,
    re-serialized in memory.
    """
    if weights is None or not Path(weights).is_file():
        where = "no --inception-weights given" if weights is None else f"--inception-weights {weights} does not exist"
        raise PartError(f"FID needs the Inception-v3 weights as a local file and {where}. Download torch-fidelity's "
                        f"{INCEPTION_FILE} (the pt_inception-2015-12-05 weights) once from {INCEPTION_URL} and pass "
                        "--inception-weights PATH; or use --features clip (FD in the project's CLIP space)")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics builds its Inception from it)
    except ImportError as e:
        raise PartError("--features inception needs the torch-fidelity package (pip install torch-fidelity); "
                        "--features clip works without it") from e
    from torchmetrics.image.fid import NoTrainInceptionV3

    buffer = io.BytesIO()
    torch.save(read_inception_weights(weights), buffer)
    buffer.seek(0)
    try:
        net = NoTrainInceptionV3("inception-v3-compat", [str(dims)], feature_extractor_weights_path=buffer,
                                 antialias=False)
    except RuntimeError as e:  # load_state_dict(strict=True): missing / unexpected keys, wrong shapes
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        detail = "; ".join(line if len(line) < 200 else line[:200] + " …" for line in lines[:3])
        raise PartError(f"--inception-weights {weights} does not fit torch-fidelity's Inception-v3 ({detail}); "
                        f"pass its {INCEPTION_FILE}") from e
    net.num_features, net.kind, net.metric_name = dims, "inception", "fid"
    net.transform = "tf1 bilinear resize to 299, no antialias"  # part of the cache key, like CLIPImageFeatures'
    return net


class FeatureInput(nn.Module):
    """Identity ``feature=`` module: torchmetrics' FD/KID then consume features extracted (or cached) once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def metric_name(extractor: nn.Module) -> str:
    """``fid`` for Inception features, ``fd_clip`` for CLIP ones (the label used everywhere)."""
    return getattr(extractor, "metric_name", "fd")


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) float64 on the CPU of uint8 images (N, 3, H, W), in batches on the extractor's device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    return torch.cat([extractor(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)])


def module_fingerprint(module: nn.Module, *extra: Any) -> str:
    """sha256 of a module's class, ``extra`` settings and every state tensor (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|{extra!r}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def extractor_fingerprint(extractor: nn.Module) -> str:
    """The cache identity of an extractor: its weights, feature size and (for CLIP) feature transform."""
    return module_fingerprint(extractor, getattr(extractor, "normalize", None), getattr(extractor, "transform", None),
                              extractor.num_features)


# ----------------------------------------------------------------------------------------------- metrics
def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017, eq. 6), computed by
    torchmetrics' ``FrechetInceptionDistance`` in float64 (unbiased covariances)."""
    metric = FrechetInceptionDistance(feature=FeatureInput(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of min(``subset_size``, N) samples (Bińkowski et al.
    2018, sec. 4: unbiased MMD² with k(x, y) = (xᵀy / d + 1)³), by torchmetrics; subsets drawn with ``seed``."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():  # "will save all extracted features": known, they are small here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=FeatureInput(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, name: str, kid_subset_size: int = 1000,
                         kid_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """``{name: FD, kid…: KID mean, kid…_std}`` with KID named after the space (``kid`` / ``kid_clip``)."""
    kid = "kid_clip" if name == "fd_clip" else "kid"
    kid_mean, kid_std = kernel_inception_distance(real, fake, kid_subset_size, kid_subsets, seed)
    return {name: frechet_distance(real, fake), kid: kid_mean, f"{kid}_std": kid_std}


# ------------------------------------------------------------------------------------------- CLIP score
class _ProjectCLIP(nn.Module):
    """The project's text conditioner + image tower behind the ``get_*_features`` interface ``CLIPScore`` calls."""

    def __init__(self, text_encoder: CLIPTextConditioner, image_encoder: CLIPImageEncoder) -> None:
        super().__init__()
        if text_encoder.pooled_dim != image_encoder.config.embed_dim:
            raise PartError(f"text encoder embeds to {text_encoder.pooled_dim} dims but the image encoder to "
                            f"{image_encoder.config.embed_dim}: they are not the two towers of one CLIP")
        self.text, self.image = text_encoder, image_encoder.eval()
        self.config = SimpleNamespace()  # CLIPScore looks for config.text_config (HF models); we truncate ourselves

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image(pixel_values)

    @torch.no_grad()
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text.pooled_embedding(input_ids, attention_mask.bool())


class _ProjectProcessor:
    """uint8 images → [-1, 1] pixels; prompts → the text conditioner's ids and mask (``CLIPScore``'s processor)."""

    def __init__(self, text_encoder: CLIPTextConditioner) -> None:
        self.text = text_encoder

    def __call__(self, images: Sequence[torch.Tensor] | None = None, text: Sequence[str] | None = None,
                 **_: Any) -> dict[str, torch.Tensor]:
        if images is not None:
            return {"pixel_values": torch.stack(list(images)).float() / 127.5 - 1}
        ids, mask = self.text.tokenize(list(text))
        return {"input_ids": ids, "attention_mask": mask}


def project_clip_score(text_encoder: CLIPTextConditioner, image_encoder: CLIPImageEncoder) -> nn.Module:
    """torchmetrics ``CLIPScore`` (Hessel et al. 2021, sec. 3) in the project's CLIP space."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: (_ProjectCLIP(text_encoder, image_encoder),
                                                 _ProjectProcessor(text_encoder)))


class _HFCLIP(nn.Module):
    """A transformers ``CLIPModel`` whose ``get_*_features`` return the projected embeddings as tensors
    (transformers 5 returns output objects, which torchmetrics 1.9's ``CLIPScore`` cannot normalize)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)


def hf_clip_score(path: str | Path) -> nn.Module:
    """torchmetrics ``CLIPScore`` with a local transformers CLIP folder (``CLIPModel`` + ``CLIPProcessor``)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise PartError(f"--clip-score-model {path} is not a transformers CLIP folder (save_pretrained of a CLIPModel "
                        "and its CLIPProcessor); nothing is downloaded")
    return CLIPScore(model_name_or_path=lambda: (_HFCLIP(CLIPModel.from_pretrained(path, local_files_only=True)),
                                                 CLIPProcessor.from_pretrained(path, local_files_only=True)))


@torch.no_grad()
def clip_score(metric: nn.Module, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> float:
    """Mean CLIP score of uint8 images (N, 3, H, W) against their prompts (``metric`` from ``*_clip_score``)."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images for {len(prompts)} prompts")
    metric.reset()
    for start in range(0, len(prompts), batch_size):
        metric.update(images[start:start + batch_size], list(prompts[start:start + batch_size]))
    return float(metric.compute())


# ------------------------------------------------------------------------------------- real images, cache
@dataclass
class RealSplit:
    """The first ``n`` samples of a split, in shard order: uint8 images, captions and metadata."""

    images: torch.Tensor
    captions: list[str]
    metas: list[dict[str, Any]]


def load_split(data_dir: str | Path, split: str, n: int, resolution: int) -> RealSplit:
    """Read the first ``n`` decodable samples of ``data_dir/split`` (resized and centre-cropped to ``resolution``)."""
    from ldm.data.webdata import ShardDataset

    if n < 2:
        raise UsageError(f"--n must be >= 2 (a covariance needs two samples), got {n}")
    dataset = ShardDataset(list_shards(data_dir, split), resolution, min(n, 256), shuffle_buffer=0, rank=0,
                           world_size=1)
    images, captions, metas = [], [], []
    for batch in dataset:
        images.append(to_uint8(batch["image"]))
        captions += batch["caption"]
        metas += batch["meta"]
        if len(captions) >= n:
            break
    if len(captions) < n:
        raise UsageError(f"{data_dir} split {split!r} has only {len(captions)} usable samples; "
                         "lower --n to at most that")
    return RealSplit(torch.cat(images)[:n], captions[:n], metas[:n])


def data_fingerprint(data_dir: str | Path, split: str) -> list[list[Any]]:
    """(absolute path, size, mtime_ns) of every shard of the split: rebuilt or edited shards change it."""
    out = []
    for url in list_shards(data_dir, split):
        st = os.stat(url)
        out.append([os.path.abspath(url), st.st_size, st.st_mtime_ns])
    return out


def real_cache_key(data_dir: str | Path, split: str, resolution: int, n: int, extractor: nn.Module) -> dict[str, Any]:
    """What the real features depend on: the shards, split, image size, sample count and extractor weights."""
    return {"version": CACHE_VERSION, "data": data_fingerprint(data_dir, split), "split": split,
            "size": resolution, "n": n, "extractor": metric_name(extractor),
            "extractor_hash": extractor_fingerprint(extractor)}


def cached_features(key: dict[str, Any], cache_dir: str | Path | None, compute: Callable[[], torch.Tensor]
                    ) -> tuple[torch.Tensor, bool]:
    """Features stored under ``key`` in ``cache_dir`` (safetensors), else ``compute()`` them and store them.

    Returns ``(features, hit)``. ``cache_dir=None`` disables the cache.
    """
    if cache_dir is None:
        return compute(), False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    name = f"{key.get('split', 'x')}-{key.get('extractor', 'fd')}-n{key.get('n', 0)}-{digest}.safetensors"
    path = Path(cache_dir) / name
    if path.is_file():
        return load_file(str(path))["features"], True
    features = compute()
    metadata = {"key": json.dumps(key, sort_keys=True)}
    atomic_write_bytes(path, save({"features": features.contiguous()}, metadata=metadata))
    return features, False
