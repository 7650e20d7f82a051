"""``ldm serve``: a local web page for text-to-image, img2img and inpainting with a drawn mask.

Why FastAPI + one static page and not gradio: the page needs a form, a canvas to draw a mask on, a progress bar
and a gallery — about 250 lines of plain HTML/JS (``ldm/serve_static/index.html``) — and the server needs four
JSON routes. FastAPI + uvicorn add a handful of small pure-Python packages to what ``ldm`` already installs
(starlette, h11, …; pydantic and anyio are there); gradio brings several dozen (its own frontend build, pandas,
ffmpy, …) and an upgrade churn this project would have to follow.
Both are in the optional ``serve`` extra (``pip install 'ldm[serve]'``).

Behaviour:

* bound to 127.0.0.1 unless ``--host`` says otherwise (the page runs models on this machine for whoever can
  reach it);
* every request is validated before it is queued — prompt length, steps, image count and size, sampler, edit
  options, uploads — and a bad one is a 4xx answer with one clear message ``{"error": "..."}``;
* one request runs at a time per model, on one worker thread, from a bounded FIFO queue (a full queue is 429);
  a job reports its position in the queue, then its step, a preview of x̂0 (the pipeline's per-step callback),
  and at the end its images and resolved parameters;
* images are PNGs carrying their generation parameters (``ldm.generation``: ``ldm generate --from-png`` makes
  one again, given the uploaded init image / mask with ``--init-image`` / ``--mask``).
"""

# no `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time, and
# Request is imported inside create_app (fastapi is an optional extra)
import base64
import binascii
import hashlib
import io
import json
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ldm.diffusion.samplers import SAMPLERS
from ldm.errors import LdmError
from ldm.generation import (
    GenerationRequest,
    build_edit,
    load_classifier,
    parameters_line,
    pipeline_fingerprint,
    png_bytes,
    png_metadata,
    resolve,
    run_request,
)
from ldm.io import weights_hash
from ldm.visual import to_pil

EDIT_MODES = ("txt2img", "img2img", "inpaint")


@dataclass
class Limits:
    """What one request may ask for (``ldm serve`` flags) and how many may wait."""

    max_steps: int = 100
    max_images: int = 8
    max_size: int = 512
    max_prompt_chars: int = 500
    max_upload_bytes: int = 4 * 1024 * 1024
    max_queue: int = 8
    keep_jobs: int = 32


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and one line for the person who sent it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One queued request and what the page polls: status, progress, preview, results."""

    id: str
    request: "GenerationRequest"
    images: dict[str, Image.Image]
    status: str = "queued"
    step: int = 0
    total: int = 0
    preview: str | None = None
    pngs: list[bytes] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)


# ---- request validation -------------------------------------------------------------------------------------
def _number(body: dict[str, Any], key: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value) \
            or not math.isfinite(value) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise RequestError(422, f"{key} must be {what} in [{low:g}, {high:g}], got {value!r}")
    return kind(value)


def _text(body: dict[str, Any], key: str, limit: int, default: str | None = "") -> str | None:
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(422, f"{key} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(422, f"{key} is {len(value)} characters long; at most {limit} are accepted")
    return value


def decode_upload(value: Any, key: str, limit: int) -> tuple[bytes, Image.Image]:
    """A ``data:image/...;base64,`` URL (or bare base64) → (its bytes, the RGB image); bad input is a 4xx."""
    if not isinstance(value, str) or not value:
        raise RequestError(422, f"{key} must be an image as a data URL (data:image/png;base64,...)")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    if len(data) * 3 // 4 > limit:
        raise RequestError(413, f"{key} is larger than {limit // 1024} KiB")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > 4096 * 4096:
                raise RequestError(413, f"{key} is {im.width}x{im.height} pixels; too large")
            return raw, im.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise RequestError(422, f"{key} is not a readable image ({type(e).__name__})") from None


def parse_request(body: Any, pipe: Any, limits: Limits, classifier: Any = None, classifier_dir: str | None = None
                  ) -> tuple[GenerationRequest, dict[str, Image.Image]]:
    """The page's JSON → a resolved :class:`GenerationRequest` and its uploaded images, or a :class:`RequestError`.
    ``classifier``/``classifier_dir``: the served classifier (loaded) and its folder (recorded in the PNGs)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    known = {"prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "n", "height", "width", "mode",
             "strength", "init_image", "mask", "classifier_scale", "classifier_labels"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; the page sends {sorted(known)}")
    prompt = _text(body, "prompt", limits.max_prompt_chars)
    f = pipe.vae.config.downsample_factor
    sampler = body.get("sampler") or pipe.config.sampler
    if sampler not in SAMPLERS:
        raise RequestError(422, f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    sizes = {k: _number(body, k, int, f, limits.max_size, None) for k in ("height", "width")}
    for key, value in sizes.items():
        if value is not None and value % f:
            raise RequestError(422, f"{key} must be a multiple of {f} (the VAE's factor), got {value}")
    mode = body.get("mode", "txt2img")
    if mode not in EDIT_MODES:
        raise RequestError(422, f"mode must be one of {list(EDIT_MODES)}, got {mode!r}")
    images, uploaded = {}, {}
    if mode != "txt2img":
        uploaded["init_image"], images["init_image"] = decode_upload(body.get("init_image"), "init_image",
                                                                     limits.max_upload_bytes)
    if mode == "inpaint":
        uploaded["mask"], images["mask"] = decode_upload(body.get("mask"), "mask", limits.max_upload_bytes)
    elif body.get("mask"):
        raise RequestError(422, "a mask is only used with mode 'inpaint'")
    labels = body.get("classifier_labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise RequestError(422, "classifier_labels must map label names to class names, e.g. {\"color\": \"red\"}")
    scale = _number(body, "classifier_scale", float, 0, 100, 0.0)
    if (labels and scale) and classifier is None:
        raise RequestError(422, "this server has no classifier (start it with --classifier DIR)")
    request = GenerationRequest(
        prompts=[prompt], negative_prompt=_text(body, "negative_prompt", limits.max_prompt_chars, None) or None,
        n=_number(body, "n", int, 1, limits.max_images, 1),
        steps=_number(body, "steps", int, 1, limits.max_steps, None),
        guidance=_number(body, "guidance", float, 0, 50, None), sampler=sampler,
        seed=_number(body, "seed", int, 0, 2**31 - 1, 0), height=sizes["height"], width=sizes["width"],
        batch_size=limits.max_images, init_image="(uploaded)" if "init_image" in images else None,
        mask="(uploaded)" if "mask" in images else None,
        strength=_number(body, "strength", float, 0, 1, None) if mode != "txt2img" else None,
        classifier=classifier_dir if labels and scale else None, classifier_scale=scale if labels else 0.0,
        classifier_labels=dict(labels) if scale else {})
    if body.get("strength") is not None and mode == "txt2img":
        raise RequestError(422, "strength is used with an init image (mode 'img2img' or 'inpaint')")
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in uploaded.items()}
    if request.classifier:
        digests["classifier"] = weights_hash(classifier)
    try:
        if request.classifier:
            classifier.targets(request.classifier_labels)
        request = resolve(pipe, request, digests)
        build_edit(request, images)
    except (LdmError, ValueError) as e:
        raise RequestError(422, str(e)) from None
    return request, images


# ---- the queue and its worker -----------------------------------------------------------------------------
class Worker:
    """One model, one thread: jobs run in arrival order; finished ones are kept (the newest ``keep_jobs``)."""

    def __init__(self, pipe: Any, pipeline_dir: str, limits: Limits, classifier: Any = None) -> None:
        self.pipe, self.pipeline_dir, self.limits, self.classifier = pipe, pipeline_dir, limits, classifier
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest, images: dict[str, Image.Image]) -> Job:
        job = Job(uuid.uuid4().hex[:12], request, images)
        with self.lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise RequestError(429, f"{self.limits.max_queue} requests are already waiting; try again soon"
                                   ) from None
            self.jobs[job.id] = job
            while len(self.jobs) > self.limits.keep_jobs:
                oldest = next(iter(self.jobs.values()))
                if oldest.status not in ("done", "error"):
                    break
                self.jobs.popitem(last=False)
        return job

    def position(self, job: Job) -> int:
        """How many jobs run or wait before ``job`` (0 = it is running or finished)."""
        if job.status != "queued":
            return 0
        with self.lock:
            ahead = [j for j in self.jobs.values() if j.created < job.created and j.status in ("queued", "running")]
        return len(ahead)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            job.status = "running"
            try:
                self._run(job)
                job.status = "done"
            except Exception as e:  # noqa: BLE001 - a failed job is reported to its page, the server goes on
                job.error, job.status = f"{type(e).__name__}: {e}", "error"
            finally:
                job.images = {}

    def _run(self, job: Job) -> None:
        pipe = self.pipe

        def on_step(info: dict[str, Any]) -> None:
            job.step, job.total = info["step"], info["total"]
            if info["step"] % 2 == 0 or info["step"] == info["total"]:
                job.preview = data_url(to_pil(pipe.decode(info["x0"][:1]))[0])

        request = job.request
        images = run_request(pipe, request, callback=on_step, images=job.images,
                             classifier=self.classifier if request.classifier else None)
        fingerprint = pipeline_fingerprint(pipe)
        job.pngs = [png_bytes(im, png_metadata(request, fingerprint, self.pipeline_dir, i),
                              parameters_line(request, fingerprint, i)) for i, im in enumerate(to_pil(images))]


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(pipe: Any, pipeline_dir: str = "", limits: Limits | None = None, classifier: Any = None,
               classifier_dir: str | None = None):
    """The FastAPI app serving ``pipe``: ``/`` (the page), ``/api/info``, ``POST /api/jobs``, ``/api/jobs/{id}``
    and ``/api/jobs/{id}/images/{k}.png``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    limits = limits or Limits()
    worker = Worker(pipe, pipeline_dir, limits, classifier)
    app = FastAPI(title="ldm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    page = resources.files("ldm").joinpath("serve_static/index.html").read_text(encoding="utf-8")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        c = pipe.config
        return {"defaults": asdict(c), "samplers": list(SAMPLERS), "limits": asdict(limits),
                "factor": pipe.vae.config.downsample_factor, "pipeline": pipeline_dir,
                "classifier_labels": classifier.config.labels if classifier is not None else None}

    @app.post("/api/jobs")
    async def submit(request: Request) -> JSONResponse:
        raw = await request.body()
        if len(raw) > 3 * limits.max_upload_bytes:
            return error(413, f"the request is larger than {3 * limits.max_upload_bytes // 1024} KiB")
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return error(400, "the request body is not valid JSON")
        try:
            parsed, images = parse_request(body, pipe, limits, classifier, classifier_dir)
            job = worker.submit(parsed, images)
        except RequestError as e:
            return error(e.status, str(e))
        return JSONResponse({"job": job.id, "position": worker.position(job)}, status_code=202)

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str) -> JSONResponse:
        job = worker.jobs.get(job_id)
        if job is None:
            return error(404, f"no job {job_id!r} (finished jobs are kept for a while only)")
        out = {"job": job.id, "status": job.status, "position": worker.position(job), "step": job.step,
               "total": job.total, "preview": job.preview, "error": job.error,
               "parameters": asdict(job.request)}
        if job.status == "done":
            out["images"] = [f"/api/jobs/{job.id}/images/{k}.png" for k in range(len(job.pngs))]
        return JSONResponse(out)

    @app.get("/api/jobs/{job_id}/images/{index}.png")
    def image(job_id: str, index: int) -> Response:
        job = worker.jobs.get(job_id)
        if job is None or job.status != "done" or not 0 <= index < len(job.pngs):
            return error(404, f"no image {index} of job {job_id!r}")
        name = f"ldm-{job.id}-{index}.png"
        return Response(job.pngs[index], media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{name}"'})

    return app


def serve(pipeline: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          classifier: str | Path | None = None, limits: Limits | None = None, allow_mismatch: bool = False) -> None:
    """Load the pipeline (and classifier) and serve the page until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise LdmError("ldm serve needs the 'serve' extra: pip install 'ldm[serve]' (fastapi, uvicorn)") from None
    import torch

    from ldm.pipeline import TextToImagePipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImagePipeline.from_pretrained(pipeline, device=device, allow_mismatch=allow_mismatch)
    loaded = load_classifier(classifier, pipe) if classifier else None
    app = create_app(pipe, str(pipeline), limits, loaded, str(classifier) if classifier else None)
    print(f"ldm serve: http://{host}:{port}/  (pipeline {pipeline}; Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
