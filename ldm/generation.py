"""One generation request, run the same way from the command line, the web page and a PNG's own metadata.

:class:`GenerationRequest` holds every parameter of an ``ldm generate`` call (prompts, negative prompt, seed,
sampler, steps, guidance, size, and the edit and classifier-guidance options, with files named by path and
sha256). :func:`run_request` resolves it against a pipeline (defaults from ``pipeline.json`` filled in, so what is
recorded is what ran) and generates. Every image written by :func:`save_png` carries the resolved request, the
image's index in it and the pipeline's weight fingerprint in a PNG text chunk (``ldm``, JSON; beside it a
human-readable ``parameters`` line), and :func:`read_png_request` reads them back: running the request again
for that index (``only_index``: only its batch is computed) reproduces the image bit for bit, on the same kind
of device, because the computation is the very same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ldm import __version__
from ldm.editing import ImageEdit, read_image
from ldm.errors import UsageError
from ldm.io import file_sha256, load_part, part_metadata, weights_hash

PNG_KEY = "ldm"
EXIF_DESCRIPTION = 0x010E
MAX_PROMPTS_RECORDED = 256


@dataclass
class GenerationRequest:
    """Everything that decides the images of one call (see the module docstring). ``None`` = the pipeline's
    default; :func:`resolve` fills those in."""

    prompts: list[str]
    negative_prompt: str | None = None
    n: int = 1
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    sampler: str | None = None
    eta: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch_size: int = 64
    init_image: str | None = None
    init_image_sha256: str | None = None
    mask: str | None = None
    mask_sha256: str | None = None
    strength: float | None = None
    invert: bool = False
    source_prompt: str = ""
    colorize: bool = False
    resample: int = 0
    classifier: str | None = None
    classifier_sha256: str | None = None
    classifier_scale: float = 0.0
    classifier_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "request") -> GenerationRequest:
        """Rebuild from :func:`dataclasses.asdict` output; unknown keys are a UsageError naming ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown or "prompts" not in values:
            raise UsageError(f"{source}: not an ldm generation request (unknown keys {unknown})")
        return cls(**values)

    @property
    def mode(self) -> str:
        """txt2img, img2img, invert, inpaint or colorize."""
        if self.init_image is None:
            return "txt2img"
        return "invert" if self.invert else "inpaint" if self.mask else "colorize" if self.colorize else "img2img"


def pipeline_fingerprint(pipe: Any) -> str:
    """sha256 over the weight hashes of the VAE, text encoder and denoiser and the schedule's config: two pipelines
    with the same fingerprint make the same images. Parts never saved are hashed from their tensors."""
    cached = getattr(pipe, "_ldm_fingerprint", None)
    if cached:
        return cached
    parts = {}
    for name in ("vae", "text_encoder", "denoiser"):
        module = getattr(pipe, name)
        digest = weights_hash(module)
        if digest is None:
            h = hashlib.sha256()
            for key, value in module.state_dict().items():
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            digest = h.hexdigest()
        parts[name] = digest
    parts["scheduler"] = pipe.schedule.to_config()
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    pipe._ldm_fingerprint = fingerprint
    return fingerprint


def resolve(pipe: Any, request: GenerationRequest, digests: dict[str, str] | None = None) -> GenerationRequest:
    """``request`` with the pipeline's defaults filled in and its files' sha256 recorded (checked where given).
    ``digests``: the sha256 of inputs that came without a file to hash (an uploaded init image or mask, a
    classifier already loaded), by field name."""
    digests = digests or {}
    c = pipe.config
    sampler = request.sampler or ("ddim" if request.invert else c.sampler)
    out = dataclasses.replace(
        request, prompts=list(request.prompts), steps=request.steps or c.steps,
        guidance=c.guidance if request.guidance is None else request.guidance,
        guidance_rescale=c.guidance_rescale if request.guidance_rescale is None else request.guidance_rescale,
        sampler=sampler, height=request.height or c.height, width=request.width or c.width,
        classifier_labels=dict(request.classifier_labels))
    for name in ("init_image", "mask", "classifier"):
        path = getattr(out, name)
        if name in digests:
            digest = digests[name]
        elif path is None:
            continue
        else:
            target = Path(path) / "model.safetensors" if name == "classifier" else Path(path)
            if not target.is_file():
                raise UsageError(f"--{name.replace('_', '-')} {path} does not exist")
            digest = file_sha256(target)
        recorded = getattr(out, f"{name}_sha256")
        if recorded and recorded != digest:
            raise UsageError(f"--{name.replace('_', '-')} {path} is not the file this image was made from "
                             f"(sha256 {digest[:12]}…, recorded {recorded[:12]}…)")
        setattr(out, f"{name}_sha256", digest)
    return out


def load_classifier(path: str | Path, pipe: Any) -> torch.nn.Module:
    """A ``LatentClassifier`` part, refused if it was trained on another VAE's latents than ``pipe``'s."""
    classifier = load_part(path, kind="classifier").to(pipe.device)
    trained_on = (part_metadata(path).get("_trained_with") or {}).get("vae")
    current = weights_hash(pipe.vae)
    if trained_on and current and trained_on != current:
        raise UsageError(f"classifier {path} was trained on the latents of another VAE (sha256 {trained_on[:12]}…) "
                         f"than this pipeline's ({current[:12]}…): train it on this pipeline's latent cache")
    return classifier.requires_grad_(False)


def build_edit(request: GenerationRequest, images: dict[str, Image.Image] | None = None) -> ImageEdit | None:
    """The :class:`ImageEdit` a request asks for (None for text-to-image). ``images`` may hold the init image and
    mask already read (the web server gets them with the request); otherwise they are read from their paths."""
    images = images or {}
    if request.init_image is None and "init_image" not in images:
        if request.mask or request.invert or request.colorize or request.strength is not None:
            raise UsageError("mask, strength, invert and colorize edit an init image: give one")
        return None
    modes = [m for m, on in (("invert", request.invert), ("inpaint", request.mask is not None or "mask" in images),
                             ("colorize", request.colorize)) if on]
    if len(modes) > 1:
        raise UsageError(f"choose one edit: {' and '.join(modes)} do not combine")
    image = images.get("init_image") or read_image(request.init_image, "--init-image")
    mask = images.get("mask") or (read_image(request.mask, "--mask") if request.mask else None)
    return ImageEdit(image, modes[0] if modes else "img2img", request.strength, mask, request.source_prompt,
                     request.resample)


def run_request(pipe: Any, request: GenerationRequest, *, progress: bool = False,
                callback: Callable[[dict[str, Any]], None] | None = None, only_index: int | None = None,
                images: dict[str, Image.Image] | None = None, classifier: torch.nn.Module | None = None
                ) -> torch.Tensor:
    """Generate the images of a *resolved* request (:func:`resolve`): (N, 3, H, W) in [-1, 1], or only image
    ``only_index`` (1, 3, H, W). ``classifier``: the loaded ``request.classifier`` (loaded here if None)."""
    edit = build_edit(request, images)
    if request.classifier and classifier is None:
        classifier = load_classifier(request.classifier, pipe)
    extra = {} if request.eta is None else {"eta": request.eta}
    return pipe.generate(request.prompts, negative_prompt=request.negative_prompt, steps=request.steps,
                         guidance=request.guidance, sampler=request.sampler, seed=request.seed, height=request.height,
                         width=request.width, n_per_prompt=request.n, batch_size=request.batch_size,
                         guidance_rescale=request.guidance_rescale, progress=progress, edit=edit,
                         classifier=classifier if request.classifier else None,
                         classifier_scale=request.classifier_scale if request.classifier else 0.0,
                         classifier_labels=request.classifier_labels or None, callback=callback,
                         only_index=only_index, **extra)


# ---- PNG metadata ------------------------------------------------------------------------------------------
def png_metadata(request: GenerationRequest, fingerprint: str, pipeline: str | None, index: int | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON an image carries: the resolved request, the image's index in it (None for a grid of all of
    them), the pipeline folder and fingerprint, the ldm version, and ``extra`` (e.g. the grid's layout)."""
    meta = {"ldm_version": __version__, "pipeline": pipeline, "pipeline_sha256": fingerprint,
            "request": asdict(request), "index": index}
    if index is not None:
        meta["prompt"] = request.prompts[index // request.n]
    return {**meta, **(extra or {})}


def parameters_line(request: GenerationRequest, fingerprint: str, index: int | None) -> str:
    """A human-readable summary (in the spirit of other tools' ``parameters`` chunk)."""
    prompt = request.prompts[index // request.n] if index is not None else " | ".join(request.prompts)
    parts = [f"Steps: {request.steps}", f"Sampler: {request.sampler}", f"CFG scale: {request.guidance:g}",
             f"Seed: {request.seed}", f"Size: {request.width}x{request.height}", f"Pipeline: {fingerprint[:12]}"]
    if request.mode != "txt2img":
        parts.append(f"Edit: {request.mode}" + (f" (strength {request.strength:g})" if request.strength is not None
                                                else ""))
    if request.classifier:
        parts.append(f"Classifier scale: {request.classifier_scale:g} {request.classifier_labels}")
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}"


def png_bytes(image: Image.Image, meta: dict[str, Any], parameters: str | None = None) -> bytes:
    """PNG bytes of ``image`` with ``meta`` as JSON in the ``ldm`` iTXt chunk (UTF-8) and ``parameters``."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(meta, sort_keys=True, ensure_ascii=False))
    if parameters:
        info.add_itxt("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, meta: dict[str, Any], parameters: str | None = None) -> Path:
    """Write ``image`` with its metadata (:func:`png_bytes`) to ``path``. A grid asked for as .jpg/.webp keeps the
    JSON in its EXIF ImageDescription (tag 0x010E) instead, since those formats have no text chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        path.write_bytes(png_bytes(image, meta, parameters))
    else:
        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = json.dumps(meta, sort_keys=True)
        image.save(path, exif=exif)
    return path


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The ``ldm`` metadata of a PNG written by ``ldm generate`` (a UsageError naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--from-png {path} does not exist")
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(PNG_KEY) or im.getexif().get(EXIF_DESCRIPTION)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--from-png {path} is not a readable image ({e})") from None
    if text is None:
        raise UsageError(f"--from-png {path} carries no ldm generation parameters (was it written by ldm generate?)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--from-png {path}: its ldm metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("request"), dict):
        raise UsageError(f"--from-png {path}: its ldm metadata holds no request")
    return meta


def read_png_request(path: str | Path) -> tuple[GenerationRequest, dict[str, Any]]:
    """(the request an ldm PNG was made by, its whole metadata)."""
    meta = read_png_metadata(path)
    return GenerationRequest.from_dict(meta["request"], f"--from-png {path}"), meta


def check_fingerprint(meta: dict[str, Any], pipe: Any, pipeline_dir: str | Path, source: str) -> None:
    """Refuse to reproduce an image with another pipeline than the one that made it."""
    recorded, current = meta.get("pipeline_sha256"), pipeline_fingerprint(pipe)
    if recorded and recorded != current:
        raise UsageError(f"{source} was made with another pipeline ({meta.get('pipeline')}, fingerprint "
                         f"{recorded[:12]}…) than --pipeline {pipeline_dir} ({current[:12]}…)")


def write_image(image: torch.Tensor, request: GenerationRequest, pipe: Any, pipeline: str | Path | None,
                path: str | Path, index: int) -> Path:
    """Image ``index`` of a request ((3, H, W) in [-1, 1]) as a PNG carrying its metadata."""
    from ldm.visual import to_pil

    fingerprint = pipeline_fingerprint(pipe)
    return save_png(to_pil(image[None])[0], path, png_metadata(request, fingerprint, str(pipeline), index),
                    parameters_line(request, fingerprint, index))


def write_images(images: torch.Tensor, request: GenerationRequest, pipe: Any, pipeline: str | Path | None,
                 out: str | Path, scale: int = 4, singles: bool = True) -> tuple[Path, Path | None]:
    """The grid (one row per prompt, labelled with it, upscaled ``scale``×) at ``out`` and, with ``singles``, each
    image at ``<out without suffix>/PPP_NN.png``; every PNG carries its metadata (the grid's has no index and
    its layout). Returns (grid path, singles folder or None)."""
    from ldm.visual import image_grid, to_pil

    out = Path(out)
    fingerprint = pipeline_fingerprint(pipe)
    pil = to_pil(images)
    grid = image_grid(pil, rows=len(request.prompts), scale=scale, row_labels=request.prompts)
    meta = png_metadata(request, fingerprint, str(pipeline), None, {"grid": {"scale": scale}})
    save_png(grid, out, meta, parameters_line(request, fingerprint, None))
    if not singles:
        return out, None
    folder = out.with_suffix("")
    for i in range(len(pil)):
        write_image(images[i], request, pipe, pipeline, folder / f"{i // request.n:03d}_{i % request.n:02d}.png", i)
    (folder / "prompts.txt").write_text("\n".join(request.prompts) + "\n")
    return out, folder
