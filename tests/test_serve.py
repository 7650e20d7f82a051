"""ldm serve: bad requests are 4xx with one clear message; a good one runs on the queue and gives PNGs that carry their
parameters and are made again bit for bit from them; the queue is bounded; inpainting through the API."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from tiny_parts import tiny_pipeline  # noqa: E402

from ldm.generation import GenerationRequest, build_edit, read_png_request, run_request  # noqa: E402
from ldm.serve import Limits, create_app  # noqa: E402
from ldm.visual import to_pil  # noqa: E402

LIMITS = Limits(max_steps=10, max_images=4, max_size=64, max_prompt_chars=50, max_upload_bytes=64 * 1024)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def client(pipe):
    return TestClient(create_app(pipe, "tiny", LIMITS))


def wait(client: TestClient, job: str, timeout: float = 60) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = client.get(f"/api/jobs/{job}").json()
        if status["status"] in ("done", "error"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not finish")


INIT = data_url(Image.new("RGB", (16, 16), (200, 30, 30)))
MASK = Image.new("L", (16, 16), 0)
MASK.paste(255, (0, 0, 8, 16))


@pytest.mark.parametrize("body, status, message", [
    (None, 400, "JSON object"),
    ({"prompt": "x" * 51}, 422, "at most 50"),
    ({"prompt": "a", "steps": 1000}, 422, "steps must be an integer in [1, 10]"),
    ({"prompt": "a", "steps": 2.5}, 422, "steps must be an integer"),
    ({"prompt": "a", "n": 0}, 422, "n must be"),
    ({"prompt": "a", "height": 18}, 422, "multiple of 4"),
    ({"prompt": "a", "width": 1024}, 422, "width must be an integer in [4, 64]"),
    ({"prompt": "a", "sampler": "plms"}, 422, "sampler must be one of"),
    ({"prompt": "a", "guidance": "high"}, 422, "guidance must be a number"),
    ({"prompt": 3}, 422, "prompt must be text"),
    ({"prompt": "a", "colour": "red"}, 422, "unknown field"),
    ({"prompt": "a", "mode": "outpaint"}, 422, "mode must be one of"),
    ({"prompt": "a", "mode": "img2img"}, 422, "init_image must be an image"),
    ({"prompt": "a", "mode": "img2img", "init_image": "data:image/png;base64,AAAA"}, 422, "not a readable image"),
    ({"prompt": "a", "mode": "img2img", "init_image": "!!"}, 422, "not a readable image"),
    ({"prompt": "a", "mode": "img2img", "init_image": "A" * 200_000}, 413, "larger than"),
    ({"prompt": "a", "mode": "inpaint", "init_image": INIT}, 422, "mask must be an image"),
    ({"prompt": "a", "mask": INIT}, 422, "only used with mode 'inpaint'"),
    ({"prompt": "a", "strength": 0.5}, 422, "strength is used with an init image"),
    ({"prompt": "a", "mode": "img2img", "init_image": INIT, "strength": 2}, 422, "strength must be a number in [0, 1]"),
    ({"prompt": "a", "classifier_scale": 2, "classifier_labels": {"color": "red"}}, 422, "has no classifier"),
    ({"prompt": "a", "classifier_labels": ["red"]}, 422, "classifier_labels must map"),
])
def test_bad_requests_are_4xx_with_a_message(client, body, status, message):
    res = client.post("/api/jobs", json=body)
    assert res.status_code == status, res.text
    assert message in res.json()["error"]


def test_non_json_and_unknown_jobs(client):
    res = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 400 and "not valid JSON" in res.json()["error"]
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.get("/api/jobs/nope/images/0.png").status_code == 404


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text and 'id="mask-canvas"' in page.text
    info = client.get("/api/info").json()
    assert info["limits"]["max_steps"] == 10 and "ddim" in info["samplers"] and info["factor"] == 4


def test_a_request_runs_and_its_pngs_make_themselves_again(client, pipe, tmp_path):
    res = client.post("/api/jobs", json={"prompt": "a red circle", "seed": 3, "steps": 3, "n": 2, "sampler": "ddim"})
    assert res.status_code == 202
    status = wait(client, res.json()["job"])
    assert status["status"] == "done", status["error"]
    assert status["step"] == status["total"] == 3 and status["preview"].startswith("data:image/png")
    assert status["parameters"]["steps"] == 3 and status["parameters"]["prompts"] == ["a red circle"]
    png = client.get(status["images"][1])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    path = tmp_path / "served.png"
    path.write_bytes(png.content)
    request, meta = read_png_request(path)
    assert meta["index"] == 1 and meta["prompt"] == "a red circle"
    again = to_pil(run_request(pipe, request, only_index=1))[0]
    assert list(again.getdata()) == list(Image.open(path).convert("RGB").getdata())


def test_inpainting_through_the_api_is_made_again_from_its_parameters(client, pipe):
    init = Image.new("RGB", (16, 16), (30, 200, 30))
    res = client.post("/api/jobs", json={"prompt": "a blue star", "steps": 3, "n": 1, "mode": "inpaint",
                                         "init_image": data_url(init), "mask": data_url(MASK)})
    assert res.status_code == 202, res.text
    status = wait(client, res.json()["job"])
    assert status["status"] == "done", status["error"]
    assert status["parameters"]["mask_sha256"] and status["parameters"]["init_image"] == "(uploaded)"
    # the request as the server ran it, with the uploaded images given back, reproduces the PNG
    request = GenerationRequest.from_dict(status["parameters"])
    images = run_request(pipe, request, images={"init_image": init, "mask": MASK})
    served = Image.open(io.BytesIO(client.get(status["images"][0]).content)).convert("RGB")
    assert list(to_pil(images)[0].getdata()) == list(served.getdata())
    assert build_edit(request, {"init_image": init, "mask": MASK}).mode == "inpaint"


def test_the_queue_is_bounded_and_runs_one_job_at_a_time(pipe):
    app = create_app(pipe, "tiny", Limits(max_steps=10, max_images=4, max_size=64, max_queue=1))
    worker = app.state.worker
    release, running = threading.Event(), threading.Event()
    original = worker._run

    def held(job):
        running.set()
        release.wait(30)
        original(job)

    worker._run = held
    client = TestClient(app)
    first = client.post("/api/jobs", json={"prompt": "a", "steps": 1, "n": 1}).json()["job"]
    assert running.wait(30)
    second = client.post("/api/jobs", json={"prompt": "b", "steps": 1, "n": 1})
    assert second.status_code == 202 and second.json()["position"] == 1
    third = client.post("/api/jobs", json={"prompt": "c", "steps": 1, "n": 1})
    assert third.status_code == 429 and "already waiting" in third.json()["error"]
    assert client.get(f"/api/jobs/{second.json()['job']}").json()["status"] == "queued"
    release.set()
    assert wait(client, first)["status"] == "done"
    assert wait(client, second.json()["job"])["status"] == "done"
