"""`stepwise serve` driven by the real clients: webuiapi (AUTOMATIC1111's API) and openai (OpenAI's Images API).

One server (uvicorn in a thread, 127.0.0.1 on a free port) holds the tiny SDXL Turbo export for the module;
every image it returns is compared pixel for pixel with `stepwise generate`'s (a subprocess) or
`Pipeline.generate`'s for the same seed and arguments. Every loop here is bounded in count and time, and
every address is the loopback's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(exported_tiny):
    return exported_tiny("sdxl", model_id="sdxl-turbo")


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    import uvicorn

    from serve.app import create_app

    out = tmp_path_factory.mktemp("serve-out")
    app = create_app([str(folder)], out_dir=out)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield {"url": f"http://{HOST}:{port}", "port": port, "app": app, "out": out}
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def pipe(folder):
    import engine

    return engine.load_pipeline(folder)


def reference(pipe, seed, **kwargs):
    """What Pipeline.generate makes, as the server's PNG decodes."""
    args = {"prompt": "a red apple", "steps": 1, "guidance": 0.0, "width": 64, "height": 64, **kwargs}
    return pipe.generate(seed=seed, **args).image


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def cli_generate(folder, tmp_path, *args) -> Image.Image:
    env = {**os.environ, "STEPWISE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    out = tmp_path / "cli.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "generate", *args, "--model", str(folder), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return Image.open(out)


def gradient(size=64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def api(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=HOST, port=server["port"], sampler="Euler a", steps=1)


def test_webuiapi_txt2img_equals_the_cli(server, folder, pipe, tmp_path):
    result = api(server).txt2img(prompt="a red apple", seed=42, cfg_scale=0, width=64, height=64, steps=1)
    assert len(result.images) == 1
    cli = cli_generate(folder, tmp_path, "a red apple", "--seed", "42", "--width", "64", "--height", "64")
    assert np.array_equal(pixels(result.images[0]), pixels(cli))
    assert result.images[0].text == cli.text  # the same PNG metadata, field by field
    info = result.info
    assert info["seed"] == 42 and info["all_seeds"] == [42]
    assert info["infotexts"][0] == cli.text["parameters"]
    assert len(info["profiles"][0]["steps"]) == 1 and "median_step_ms" in info["profiles"][0]
    # batch_size x n_iter: seeds 5, 6, 7, 8 as AUTOMATIC1111 numbers them
    batch = api(server).txt2img(prompt="a red apple", seed=5, cfg_scale=0, width=64, height=64, batch_size=2, n_iter=2)
    assert batch.info["all_seeds"] == [5, 6, 7, 8] and len(batch.images) == 4
    assert np.array_equal(pixels(batch.images[3]), reference(pipe, 8))


def test_webuiapi_img2img_and_inpaint_equal_the_cli(server, folder, pipe, tmp_path):
    start = gradient()
    start.save(tmp_path / "start.png")
    result = api(server).img2img(
        images=[start], prompt="a red apple", seed=3, steps=2, cfg_scale=0, width=64, height=64, denoising_strength=0.5
    )
    cli = cli_generate(
        folder, tmp_path, "a red apple", "--image", "start.png", "--strength", "0.5", "--steps", "2", "--seed", "3"
    )
    assert np.array_equal(pixels(result.images[0]), pixels(cli))
    assert result.images[0].text["parameters"] == cli.text["parameters"]
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (0, 0, 32, 64))  # white: repainted
    inpainted = api(server).img2img(
        images=[start], mask_image=mask, prompt="a red apple", seed=4, steps=2, cfg_scale=0, width=64, height=64,
        denoising_strength=0.5,
    )  # fmt: skip
    expected = reference(pipe, 4, steps=2, image=start, mask=mask, strength=0.5)
    assert np.array_equal(pixels(inpainted.images[0]), expected)


def test_openai_generations_and_edits_equal_the_pipeline(server, pipe):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    res = client.images.generate(
        model="sdxl-turbo", prompt="a red apple", n=2, size="64x64", response_format="b64_json", extra_body={"seed": 11}
    )
    assert [pixels(decode(d.b64_json)).shape for d in res.data] == [(64, 64, 3)] * 2
    assert np.array_equal(pixels(decode(res.data[1].b64_json)), reference(pipe, 12))
    by_url = client.images.generate(
        model="sdxl-turbo", prompt="a red apple", size="64x64", response_format="url", extra_body={"seed": 11}
    )
    fetched = requests.get(by_url.data[0].url, timeout=30)
    assert fetched.status_code == 200 and by_url.data[0].url.startswith(server["url"] + "/files/")
    assert np.array_equal(pixels(Image.open(io.BytesIO(fetched.content))), reference(pipe, 11))
    assert list(server["out"].iterdir())  # written into the output folder
    # edits: OpenAI's mask edits where it is transparent (here the left half)
    start = gradient()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    png = io.BytesIO()
    start.save(png, format="PNG")
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    edited = client.images.edit(
        model="sdxl-turbo",
        image=("start.png", png.getvalue(), "image/png"),
        mask=("mask.png", mask_png.getvalue(), "image/png"),
        prompt="a red apple",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": 2, "strength": 0.5},
    )
    white_left = Image.new("RGB", (64, 64))
    white_left.paste((255, 255, 255), (0, 0, 32, 64))
    expected = reference(pipe, 5, steps=2, image=start, mask=white_left, strength=0.5)
    assert np.array_equal(pixels(decode(edited.data[0].b64_json)), expected)


def test_openai_errors_have_openais_shape(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as exc:
        client.images.generate(model="no-such-model", prompt="a cat", size="64x64", response_format="b64_json")
    assert exc.value.body["code"] == "model_not_found" and "sdxl-turbo" in exc.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.images.generate(prompt="a cat", size="64x64", response_format="b64_json", extra_body={"steps": 30})
    assert exc.value.body["code"] == "policy_refused" and exc.value.body["message"].startswith("refused: ")
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.images.generate(prompt="a cat", size="sixty", response_format="b64_json")
    assert exc.value.body["param"] == "size"
    assert [m.id for m in client.models.list()] == ["sdxl-turbo"]


def test_a_refusal_is_422_with_the_policys_message_and_the_server_keeps_serving(server):
    import registry
    from registry import policy

    url = server["url"] + "/sdapi/v1/txt2img"
    refused = requests.post(url, json={"prompt": "a cat", "steps": 30, "width": 64, "height": 64}, timeout=60)
    assert refused.status_code == 422
    advice = policy.decide_steps(registry.get("sdxl-turbo"), 30).advice
    assert refused.json() == {"error": "Refused", "detail": f"refused: {advice}", "body": "", "errors": ""}
    forced = {"prompt": "a cat", "steps": 5, "width": 64, "height": 64, "cfg_scale": 0, "force": True}
    assert requests.post(url, json=forced, timeout=120).status_code == 200
    bad = [
        ({"data": b"{not json"}, 400, "not valid JSON"),
        ({"json": {"prompt": "a cat", "model": "nope"}}, 404, "unknown model 'nope'"),
        ({"json": {"prompt": "a cat", "width": 4096, "height": 64}}, 422, "--width 4096 is outside"),
        ({"json": {"prompt": "a cat", "batch_size": 100}}, 422, "between 1 and 8"),
        ({"json": {"prompt": "x" * 20_000}}, 422, "at most 10000"),
        ({"json": {"prompt": ""}}, 422, "the prompt is empty"),
        ({"json": {"prompt": "a cat", "cfg_scale": 7}}, 422, "takes no guidance"),
        ({"json": {"prompt": "a cat", "steps": "many"}}, 422, "steps"),
        ({"json": {"prompt": "a cat", "sampler_name": "Nope"}}, 422, "unknown sampler"),
        ({"json": {"prompt": "a cat", "cache": "fbcache"}}, 422, "few-step distilled"),  # the CLI's --cache refusal
    ]
    for kwargs, status, needle in bad:
        answer = requests.post(url, timeout=60, **kwargs)
        assert answer.status_code == status, (kwargs, answer.text)
        assert needle in answer.json()["detail"], answer.text
    # a body over the limit is refused by its Content-Length, before it is read
    with socket.create_connection((HOST, server["port"]), timeout=30) as conn:
        conn.sendall(
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n{"
        )
        head = conn.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413") and "larger than" in head, head
    ok = requests.post(url, json={"prompt": "a cat", "width": 64, "height": 64, "seed": 1}, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_four_concurrent_requests_all_complete(server, pipe):
    url = server["url"] + "/sdapi/v1/txt2img"
    answers: dict[int, requests.Response] = {}

    def ask(seed):
        answers[seed] = requests.post(
            url, json={"prompt": "a red apple", "seed": seed, "width": 64, "height": 64}, timeout=120
        )

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (21, 22, 23, 24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert sorted(answers) == [21, 22, 23, 24]
    for seed, answer in answers.items():
        assert answer.status_code == 200, answer.text
        assert np.array_equal(pixels(decode(answer.json()["images"][0])), reference(pipe, seed))


# 128 x 128: eight images take seconds on any CPU here, so a step is still ahead when a test acts mid-job
LONG_JOB = {"prompt": "a cat", "steps": 4, "width": 128, "height": 128, "batch_size": 8, "seed": 1}


def long_job(server, results, **extra):
    body = {**LONG_JOB, **extra}
    try:
        results["answer"] = requests.post(server["url"] + "/sdapi/v1/txt2img", json=body, timeout=120)
    except requests.RequestException as exc:
        results["error"] = exc


def wait_for_steps(server, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(server["url"] + "/sdapi/v1/progress", timeout=10).json()
        if state["state"]["sampling_step"] > 0:
            return state
        time.sleep(0.05)
    raise AssertionError("no step was reported")


def test_progress_reports_steps_and_interrupt_stops_the_batch(server):
    results: dict = {}
    thread = threading.Thread(target=long_job, args=(server, results))
    thread.start()
    state = wait_for_steps(server)
    assert state["state"]["sampling_steps"] == 4 and state["state"]["job"] == "txt2img"
    assert state["state"]["job_count"] == 8 and 0 < state["progress"] < 1
    assert state["stepwise"]["model"] == "sdxl-turbo" and state["stepwise"]["step_ms"]
    if state["current_image"] is not None:  # the preview, decoded from the latents
        preview = Image.open(io.BytesIO(base64.b64decode(state["current_image"])))
        assert preview.size[0] == preview.size[1] < LONG_JOB["width"]  # the latents' size
    assert requests.post(server["url"] + "/sdapi/v1/interrupt", timeout=10).status_code == 200
    thread.join(120)
    answer = results["answer"]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["stepwise"]["interrupted"] and 1 <= len(answer.json()["images"]) < 8


def test_a_client_that_goes_away_frees_its_slot(server):
    import http.client

    worker = server["app"].state.stepwise.workers["sdxl-turbo"]
    cancelled = worker.cancelled
    conn = http.client.HTTPConnection(HOST, server["port"], timeout=30)
    conn.request("POST", "/sdapi/v1/txt2img", json.dumps(LONG_JOB), {"Content-Type": "application/json"})
    wait_for_steps(server)  # the job runs; the client leaves with most of its steps ahead
    conn.close()
    deadline = time.monotonic() + 60
    while (worker.running is not None or worker.cancelled == cancelled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.cancelled == cancelled + 1 and worker.running is None
    ok = requests.post(server["url"] + "/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64})
    assert ok.status_code == 200


def test_listings(server):
    url = server["url"]
    models = requests.get(url + "/stepwise/v1/models", timeout=10).json()
    assert [m["id"] for m in models] == ["sdxl-turbo"]
    turbo = models[0]
    assert turbo["recommended_steps"] == [1, 4] and turbo["default_steps"] == 1 and turbo["cfg"] is False
    assert (turbo["width"], turbo["height"], turbo["loaded"], turbo["img2img"]) == (64, 64, True, True)
    assert requests.get(url + "/sdapi/v1/sd-models", timeout=10).json()[0]["model_name"] == "sdxl-turbo"
    names = [s["name"] for s in requests.get(url + "/sdapi/v1/samplers", timeout=10).json()]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= set(names)
    assert requests.get(url + "/files/..%2F..%2Fetc%2Fpasswd", timeout=10).status_code == 404
    karras = requests.post(
        url + "/sdapi/v1/txt2img",
        json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "DPM++ 2M Karras"},
        timeout=120,
    )
    assert karras.status_code == 200, karras.text
    assert "Sampler: DPM++ 2M Karras" in json.loads(karras.json()["info"])["infotexts"][0]


def test_sigterm_finishes_the_running_request_drops_the_waiting_one_and_exits_cleanly(folder, tmp_path):
    port = free_port()
    env = {**os.environ, "STEPWISE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "serve", "--model", str(folder), "--port", str(port),
         "--out-dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        server = {"url": f"http://{HOST}:{port}"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(server["url"] + "/sdapi/v1/sd-models", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        results, waiting = {}, {}
        thread = threading.Thread(target=long_job, args=(server, results), kwargs={"batch_size": 4})
        thread.start()
        wait_for_steps(server)
        queued = threading.Thread(target=long_job, args=(server, waiting))
        queued.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = requests.get(server["url"] + "/sdapi/v1/progress", timeout=10).json()
            if state["stepwise"]["queued"]["sdxl-turbo"]:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        thread.join(120)
        queued.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "server stopped" in output and "Traceback" not in output, output
    assert results["answer"].status_code == 200 and len(results["answer"].json()["images"]) == 4  # finished
    assert waiting["answer"].status_code == 503 and "shutting down" in waiting["answer"].json()["detail"]
    # nothing written outside the output folder: not the export, not the home, not the working folder
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    # (~/.cache/Microsoft is onnxruntime's own device id, written by every process that imports it)
    assert {p.name for p in tmp_path.iterdir()} - {".cache"} <= {"out"}


def test_the_runtime_install_needs_no_fastapi():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fastapi", "uvicorn", "starlette", "multipart"}:
            raise ImportError("blocked by test: " + name)
sys.meta_path.insert(0, Block())
import cli, engine, registry
cli.main(["serve", "--model", "sdxl-turbo"])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "pip install -e '.[serve]'" in out.stderr, out.stderr


def test_serve_command_errors_are_one_line(folder, tmp_path):
    env = {**os.environ, "STEPWISE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}

    def serve(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "serve", *args], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip

    unknown = serve("--model", "no-such-model")
    assert unknown.returncode == 2 and "error: unknown model 'no-such-model'" in unknown.stderr
    twice = serve("--model", str(folder), "--model", str(folder))
    assert twice.returncode == 2 and "two --model name the id 'sdxl-turbo'" in twice.stderr
    with socket.create_server((HOST, 0)) as taken:
        busy = serve("--model", str(folder), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "cannot listen on 127.0.0.1:" in busy.stderr and "Traceback" not in busy.stderr
    one_stage = serve("--model", str(folder), "--port", str(free_port()), "--steps-2", "30")  # generate's message
    lines = one_stage.stderr.strip().splitlines()
    assert one_stage.returncode == 2 and len(lines) == 1 and "--steps-2 is for a cascade's second stage" in lines[0]
