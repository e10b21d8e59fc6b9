"""The web page in a real headless browser (Debian's chromium driven by selenium through chromium-driver).

The server here is a stand-in built in this file: it speaks the agreed shapes of `stepwise serve`'s API
(``GET /stepwise/v1/models``, ``POST /sdapi/v1/txt2img`` and ``img2img``, ``GET /sdapi/v1/progress``,
``POST /sdapi/v1/interrupt``, HTTP 422 ``{"detail": ...}`` for a refused step count) with a fake generation of a
few 100 ms steps that returns a real PNG, plus ``serve.page.mount_page``. It runs under uvicorn on a free port
of 127.0.0.1 in a thread. The test skips, saying why, where chromium, chromedriver, selenium, fastapi or uvicorn
is missing (`.ci/run` installs chromium and chromium-driver with apt-get when they are missing).

STEPWISE_PAGE_SCREENSHOT=path.png saves a screenshot of the page with its result (and path-server.png of the
page on the real server, where serve/app.py is in the tree).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

STEP_S = 0.15  # one fake denoising step: 6 steps span about 3 of the page's 300 ms polls
FEW_STEP = {
    "id": "tiny-turbo",
    "name": "Tiny Turbo",
    "family": "sdxl",
    "kind": "few-step",
    "default_steps": 4,
    "min_steps": 1,
    "max_useful_steps": 8,
    "recommended_steps": [4, 6],
    "guidance": 0.0,
    "cfg": False,
    "width": 64,
    "height": 64,
    "loaded": True,
}
STANDARD = {
    "id": "tiny-sd",
    "name": "Tiny SD",
    "family": "sd15",
    "kind": "standard",
    "default_steps": 20,
    "min_steps": 5,
    "max_useful_steps": 50,
    "recommended_steps": [20, 30],
    "guidance": 7.5,
    "cfg": True,
    "width": 96,
    "height": 64,
    "loaded": False,
}


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _png(width: int, height: int, seed: int, shade: float = 1.0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=3)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(base[0] + x * 2) % 256, (base[1] + y * 2) % 256, (base[2] + (x + y)) % 256], axis=-1)
    img = (img * shade).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _b64png(width: int, height: int, seed: int, shade: float = 1.0) -> str:
    return base64.b64encode(_png(width, height, seed, shade)).decode()


def stand_in_app():
    """A minimal server with the agreed endpoint shapes and a fake generation."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    from serve.page import mount_page

    app = FastAPI()
    models = {m["id"]: dict(m) for m in (FEW_STEP, STANDARD)}
    lock = threading.Lock()
    state = {"job": "", "step": 0, "steps": 0, "t0": 0.0, "interrupted": False, "image": None}
    app.state.requests = []

    @app.get("/stepwise/v1/models")
    def list_models():
        return list(models.values())

    def run(body: dict) -> dict:
        app.state.requests.append(body)
        model = models.get(body.get("model") or FEW_STEP["id"])
        if model is None:
            raise HTTPException(404, detail=f"unknown model {body.get('model')!r}")
        steps = int(body.get("steps") or model["default_steps"])
        if steps < model["min_steps"] or steps > model["max_useful_steps"]:
            message = (
                f"{model['id']}: {steps} steps refused: its policy allows {model['min_steps']}"
                f"\u2013{model['max_useful_steps']} (recommended {model['recommended_steps'][0]}"
                f"\u2013{model['recommended_steps'][1]})"
            )
            # AUTOMATIC1111's error shape, as serve/app.py answers a refusal
            return JSONResponse({"error": "Refused", "detail": message, "body": "", "errors": ""}, status_code=422)
        width = int(body.get("width") or model["width"])
        height = int(body.get("height") or model["height"])
        seed = int(body.get("seed", -1))
        seed = 1234 if seed < 0 else seed
        model["loaded"] = True
        with lock:
            state.update(job="txt2img", step=0, steps=steps, t0=time.perf_counter(), interrupted=False, image=None)
        profile = []
        for i in range(steps):
            if state["interrupted"]:
                break
            t = time.perf_counter()
            time.sleep(STEP_S)
            ms = (time.perf_counter() - t) * 1000 + 40 * i  # rising: the last bar is the tallest
            profile.append({"index": i, "timestep": 999.0 - i, "sigma": None, "denoiser_ms": ms, "scheduler_ms": 0.1})
            with lock:
                state["step"] = i + 1
                state["image"] = _b64png(32, 32, seed, (i + 1) / steps)
        with lock:
            state.update(job="", step=0, steps=0, image=None)
        infotext = (
            f"{body.get('prompt', '')}\nSteps: {steps}, CFG scale: {body.get('cfg_scale')}, Seed: {seed}, "
            f"Size: {width}x{height}, Model: {model['id']}"
        )
        info = {
            "seed": seed,
            "width": width,
            "height": height,
            "model": model["id"],
            "infotexts": [infotext],
            # one profile per image, engine/profile.py's shape
            "profiles": [
                {
                    "steps": profile,
                    "load_ms": 0.0,
                    "text_encoder_ms": 12.0,
                    "vae_encode_ms": 0.0,
                    "vae_decode_ms": 30.0,
                    "total_ms": sum(s["denoiser_ms"] for s in profile) + 45.0,
                    "peak_rss_mb": 321.0,
                }
            ],
            "stepwise": {"model": model["id"], "steps_run": len(profile), "warnings": [], "interrupted": False},
        }
        params = {k: v for k, v in body.items() if k != "init_images"}
        return {"images": [_b64png(width, height, seed)], "parameters": params, "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    def txt2img(body: dict):
        return run(body)

    @app.post("/sdapi/v1/img2img")
    def img2img(body: dict):
        from PIL import Image

        init = base64.b64decode(body["init_images"][0])
        Image.open(io.BytesIO(init)).verify()  # a real image came through
        return run(body)

    @app.get("/sdapi/v1/progress")
    def progress():
        with lock:
            steps, step = state["steps"], state["step"]
            frac = step / steps if steps else 0.0
            elapsed = time.perf_counter() - state["t0"]
            eta = elapsed / step * (steps - step) if step else 0.0
            return {
                "progress": frac,
                "eta_relative": eta,
                "state": {
                    "job": state["job"],
                    "sampling_step": step,
                    "sampling_steps": steps,
                    "interrupted": state["interrupted"],
                },
                "current_image": state["image"],
                "textinfo": None,
            }

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        state["interrupted"] = True
        return {}

    mount_page(app)
    return app


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi", reason="fastapi is not installed")
    uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
    app = stand_in_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the stand-in server did not start")
        time.sleep(0.02)
    yield app, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "chromium or chromedriver is not installed (Debian: apt-get install -y chromium chromium-driver; "
            ".ci/run does it)"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1100,1300",
    ):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would download a driver) is never asked.
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    drv.set_page_load_timeout(20)
    yield drv
    drv.quit()


def _wait(drv, cond, timeout=10.0, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.03).until(lambda d: cond(d), message=f"waiting for {what}")


def _js(drv, script, *args):
    return drv.execute_script(script, *args)


def _load(drv, url):
    drv.get(url)
    _wait(drv, lambda d: _js(d, "return document.getElementById('model').dataset.ready === '1'"), what="the models")


def _set(drv, elem_id, value):
    from selenium.webdriver.common.by import By

    el = drv.find_element(By.ID, elem_id)
    el.clear()
    el.send_keys(str(value))


def _generate_and_watch(drv):
    """Click Generate; record what #progress showed until the result or an error is there."""
    from selenium.webdriver.common.by import By

    drv.find_element(By.ID, "generate").click()
    seen = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        snap = _js(
            drv,
            """
            const p = document.getElementById('progress');
            return {running: !document.getElementById('running').hidden, value: p.value,
                    text: document.getElementById('progress-text').textContent,
                    eta: document.getElementById('eta').textContent,
                    preview: !document.getElementById('preview').hidden,
                    done: !document.getElementById('generate').disabled,
                    error: document.getElementById('error').hidden ? null
                           : document.getElementById('error').textContent};
            """,
        )
        seen.append(snap)
        if snap["done"] and not snap["running"]:
            return seen
        time.sleep(0.03)
    pytest.fail(f"no answer within 15 s; last seen {seen[-1:]}")


def test_page_generates_and_refuses(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    app, url = server
    drv = browser
    t0 = time.monotonic()
    _load(drv, url)

    # the form: the models from the server, the loaded one selected, its policy shown
    sel = Select(drv.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in sel.options] == ["tiny-turbo", "tiny-sd"]
    assert sel.first_selected_option.get_attribute("value") == "tiny-turbo"
    assert drv.find_element(By.ID, "steps").get_attribute("value") == "4"
    note = drv.find_element(By.ID, "steps-note").text
    assert "recommended 4\u20136" in note and "max useful 8" in note, note
    assert drv.find_element(By.ID, "width").get_attribute("value") == "64"
    assert drv.find_element(By.CSS_SELECTOR, "label[for=steps]").text == "Steps"

    # another model brings its own defaults
    sel.select_by_value("tiny-sd")
    assert drv.find_element(By.ID, "steps").get_attribute("value") == "20"
    note = drv.find_element(By.ID, "steps-note").text
    assert "recommended 20\u201330" in note and "max useful 50" in note, note
    assert drv.find_element(By.ID, "guidance").get_attribute("value") == "7.5"
    assert "not loaded" in drv.find_element(By.ID, "model-note").text
    sel.select_by_value("tiny-turbo")
    assert drv.find_element(By.ID, "steps").get_attribute("value") == "4"

    # txt2img: the progress bar advances, then the image, its parameters and the per-step chart
    drv.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
    _set(drv, "steps", 6)
    _set(drv, "seed", 42)
    seen = _generate_and_watch(drv)
    assert not any(s["error"] for s in seen), seen[-1]
    partial = [s for s in seen if s["running"] and 0 < s["value"] < 1]
    assert partial, f"the progress bar never showed a step in between: {seen}"
    assert any("step " in s["text"] and "/ 6" in s["text"] for s in partial), partial
    assert any("s left" in s["eta"] for s in partial), partial
    assert any(s["preview"] for s in partial), partial
    values = [s["value"] for s in partial]
    assert values == sorted(values), values

    img = _wait(drv, lambda d: d.find_element(By.CSS_SELECTOR, "#result img"), what="the result image")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert _js(drv, "return arguments[0].complete && arguments[0].naturalWidth", img) == 64
    params = drv.find_element(By.ID, "params").text
    assert "42" in params and "a lighthouse at dusk" in params and "tiny-turbo" in params, params
    bars = drv.find_elements(By.CSS_SELECTOR, "#profile svg rect.bar")
    assert len(bars) == 6
    heights = [float(b.get_attribute("height")) for b in bars]
    assert all(h > 0 for h in heights) and heights[-1] == max(heights), heights
    assert "6 steps" in drv.find_element(By.ID, "profile-summary").text
    body = app.state.requests[-1]
    assert body["model"] == "tiny-turbo" and body["steps"] == 6 and body["seed"] == 42, body
    assert body["width"] == 64 and body["height"] == 64 and body["cfg_scale"] == 0

    shot = os.environ.get("STEPWISE_PAGE_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(shot)

    # a refusal: the server's 422 message, as it said it, in the page; the last result stays
    _set(drv, "steps", 30)
    seen = _generate_and_watch(drv)
    err = drv.find_element(By.ID, "error")
    assert err.is_displayed()
    assert err.text == "tiny-turbo: 30 steps refused: its policy allows 1\u20138 (recommended 4\u20136)"
    assert err.get_attribute("role") == "alert"

    # img2img: an input image file switches the request to img2img with its strength
    src = tmp_path / "input.png"
    src.write_bytes(_png(64, 64, 7))
    drv.find_element(By.ID, "init_image").send_keys(str(src))
    _wait(drv, lambda d: d.find_element(By.ID, "strength").is_enabled(), what="the strength field")
    _set(drv, "strength", 0.5)
    _set(drv, "steps", 2)
    seen = _generate_and_watch(drv)
    assert not any(s["error"] for s in seen), seen[-1]
    assert not err.is_displayed()
    body = app.state.requests[-1]
    assert body["denoising_strength"] == 0.5 and len(body["init_images"]) == 1
    assert base64.b64decode(body["init_images"][0]) == src.read_bytes()
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#profile svg rect.bar")) == 2, what="2 bars")

    assert time.monotonic() - t0 < 25


@pytest.mark.slow
def test_page_against_the_server(browser, exported_tiny, tmp_path_factory):
    """The same page on `stepwise serve` itself (serve.app.create_app) holding the tiny SDXL Turbo export:
    the policy's numbers in the form, an image with one profile bar per step, the policy's refusal shown."""
    from selenium.webdriver.common.by import By

    uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
    app_module = pytest.importorskip("serve.app", reason="serve/app.py (the server) is not in this tree")
    from serve.page import mount_page

    folder = exported_tiny("sdxl", model_id="sdxl-turbo")
    app = app_module.create_app([str(folder)], out_dir=tmp_path_factory.mktemp("serve-page-out"))
    if not any(getattr(r, "path", None) == "/" for r in app.routes):
        mount_page(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        drv = browser
        _load(drv, f"http://127.0.0.1:{port}/")
        assert drv.find_element(By.ID, "steps").get_attribute("value") == "1"  # SDXL Turbo's default
        note = drv.find_element(By.ID, "steps-note").text
        assert "recommended 1\u20134" in note and "max useful 4" in note, note

        drv.find_element(By.ID, "prompt").send_keys("a red apple")
        _set(drv, "steps", 3)
        _set(drv, "width", 64)
        _set(drv, "height", 64)
        _set(drv, "seed", 7)
        seen = _generate_and_watch(drv)
        assert not any(s["error"] for s in seen), seen[-1]
        img = drv.find_element(By.CSS_SELECTOR, "#result img")
        assert _js(drv, "return arguments[0].complete && arguments[0].naturalWidth", img) == 64
        assert len(drv.find_elements(By.CSS_SELECTOR, "#profile svg rect.bar")) == 3
        assert "7" in drv.find_element(By.ID, "params").text
        shot = os.environ.get("STEPWISE_PAGE_SCREENSHOT")
        if shot:
            drv.save_screenshot(str(Path(shot).with_name(Path(shot).stem + "-server.png")))

        _set(drv, "steps", 30)
        _generate_and_watch(drv)
        err = drv.find_element(By.ID, "error")
        assert err.is_displayed() and "30" in err.text, err.text
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
