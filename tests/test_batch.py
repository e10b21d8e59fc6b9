"""`stepwise batch` on a tiny export: the local pool's images equal Pipeline.generate's for the same seeds,
with their PNG metadata and a results manifest; a rerun skips what is finished; a bad line is one line of
error, exit 2, nothing written; Ray Data over 2 actors makes the same images; a FastAPI app factory deployed
as 2 Ray Serve replicas answers. The Ray tests are skipped when ray is not installed (the `ray` extra).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

PROMPTS = [
    {"prompt": "a red apple", "seed": 1, "size": "64x64", "steps": 1},
    {"prompt": "a blue boat", "seed": 2, "size": "64x64", "steps": 1, "negative": "blurry"},
    {"prompt": "a green hill", "seed": 3, "width": 64, "height": 64},
    {"prompt": "a red apple", "seed": 4, "size": 64, "steps": 1},
]


@pytest.fixture(scope="module")
def tiny(exported_tiny):
    return exported_tiny("sdxl", model_id="sdxl-turbo")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("batch")
    (work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return work


def stepwise(work, *args):
    env = {"STEPWISE_HOME": str(work / "home"), "PATH": "/usr/bin:/bin", "HOME": str(work), "STEPWISE_GRAPH_CACHE": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=work, capture_output=True, text=True, env=env, timeout=300
    )


def target_of(folder):
    import cli

    return cli.resolve_model(str(folder))


@pytest.fixture(scope="module")
def reference(tiny, work):
    """Each line's image from Pipeline.generate in this process, 1 thread, as the batch plans it."""
    import batch
    import engine

    pipe = engine.load_pipeline(tiny, threads=1)
    images = {}
    for job in batch.read_jobs(work / "prompts.jsonl", target_of(tiny)):
        result = pipe.generate(
            prompt=job.prompt,
            negative_prompt=job.negative,
            steps=job.steps,
            guidance=job.guidance,
            width=job.width,
            height=job.height,
            seed=job.seed,
        )
        images[job.id] = result.image
    return images


@pytest.fixture(scope="module")
def local_run(tiny, work):
    out = stepwise(
        work, "batch", "prompts.jsonl", "--model", str(tiny), "--out", "local", "--threads", "1", "--workers", "2"
    )
    assert out.returncode == 0, out.stderr
    return out


def test_local_pool_equals_pipeline_generate(local_run, reference, work):
    assert "4 images in" in local_run.stdout and "images/minute" in local_run.stdout
    assert "2 local workers × 1 thread" in local_run.stdout
    entries = [json.loads(line) for line in (work / "local" / "results.jsonl").read_text().splitlines()]
    assert [e["line"] for e in entries] == [1, 2, 3, 4]
    assert len({e["worker"] for e in entries}) <= 2
    for entry in entries:
        image = Image.open(work / "local" / entry["file"])
        np.testing.assert_array_equal(np.asarray(image), reference[entry["id"]])
        assert image.text["seed"] == str(entry["seed"]) and image.text["model"] == "sdxl-turbo"
        assert image.text["batch_id"] == entry["id"] and image.text["weights"] == "random"
        assert "Steps: 1, Sampler: Euler a" in image.text["parameters"]
    assert entries[1]["negative"] == "blurry" and entries[2]["steps"] == 1  # no steps: the model's default


def test_rerun_skips_finished(local_run, tiny, work):
    again = shutil.copytree(work / "local", work / "again")
    (again / entries_file(again, line=3)).unlink()  # one image lost: made again, the others skipped
    before = {p.name: p.stat().st_mtime_ns for p in again.glob("*.png")}
    out = stepwise(work, "batch", "prompts.jsonl", "--model", str(tiny), "--out", "again", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "3 of 4 already done" in out.stdout and "1 images in" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in again.glob("*.png") if p.name in before} == before
    assert len((again / "results.jsonl").read_text().splitlines()) == 4
    out = stepwise(work, "batch", "prompts.jsonl", "--model", str(tiny), "--out", "again")
    assert out.returncode == 0, out.stderr
    assert "4 of 4 already done" in out.stdout and "nothing left to run" in out.stdout


def entries_file(folder, line):
    for text in (folder / "results.jsonl").read_text().splitlines():
        if json.loads(text)["line"] == line:
            return json.loads(text)["file"]
    raise AssertionError(line)


@pytest.mark.parametrize(
    "line, expect",
    [
        ({"prompt": "a cat", "stpes": 2}, ['line 2: unknown key "stpes"', 'did you mean "steps"']),
        ({"prompt": "a cat", "steps": 30}, ["line 2: refused:", 'Use "steps": 1, or --force']),
        ({"prompt": "a cat", "size": "65x64"}, ["line 2:", "not a multiple of 64", 'use "width": 64']),
        ({"prompt": ""}, ["line 2: the prompt is empty"]),
        ({"prompt": "a cat", "cache": "fbcache"}, ['line 2: "cache": is refused for SDXL Turbo', "few-step"]),
    ],
)
def test_bad_line_is_one_line_exit_2_nothing_written(tiny, work, line, expect):
    (work / "bad.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps(line) + "\n")
    out = stepwise(work, "batch", "bad.jsonl", "--model", str(tiny), "--out", "bad-out")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for text in expect:
        assert text in out.stderr
    assert not (work / "bad-out").exists()


def test_a_failed_item_is_reported_and_the_others_kept(tiny, work):
    lines = [PROMPTS[0], {**PROMPTS[1], "scheduler": "FlowMatchEulerDiscreteScheduler"}]  # runs, then fails
    (work / "mixed.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = stepwise(work, "batch", "mixed.jsonl", "--model", str(tiny), "--out", "mixed", "--workers", "1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "error: 1 of 2 failed, line 2: --scheduler FlowMatchEulerDiscreteScheduler does not fit" in out.stderr
    assert "rerun to retry them" in out.stderr
    assert [json.loads(t)["line"] for t in (work / "mixed" / "results.jsonl").read_text().splitlines()] == [1]


def test_ray_unreachable_or_missing_is_one_line(tiny, work):
    out = stepwise(work, "batch", "prompts.jsonl", "--model", str(tiny), "--out", "nowhere", "--ray", "127.0.0.1:1")
    assert out.returncode == 2 and out.stderr.startswith("error: --ray 127.0.0.1:1: nothing answers there"), out.stderr
    blocker = "import sys\nclass B:\n def find_spec(self, n, p=None, t=None):\n  if n == 'ray': raise ImportError(n)\n"
    code = blocker + "sys.meta_path.insert(0, B())\nimport cli\ncli.main()\n"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "STEPWISE_HOME": str(work / "home")}
    args = ["batch", "prompts.jsonl", "--model", str(tiny), "--out", "nowhere", "--ray", "auto"]
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=work,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2 and "--ray needs the ray extra" in out.stderr and "Traceback" not in out.stderr
    assert not (work / "nowhere").exists()


def test_import_batch_imports_no_ray_and_no_torch():
    code = "import sys, batch, batch.local, batch.ray_backend; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_jobs_ids_and_seeds_are_stable(tiny, tmp_path):
    import batch

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n\n{"prompt": "a cat", "size": [64, 64]}\n')
    first, second = batch.read_jobs(path, target_of(tiny)), batch.read_jobs(path, target_of(tiny))
    assert [j.id for j in first] == [j.id for j in second] and [j.line for j in first] == [1, 3]
    assert first[0].seed == second[0].seed and first[0].id != first[1].id  # same text, other line
    assert (first[1].width, first[1].height) == (64, 64)


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from batch.ray_backend import runtime_env

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, runtime_env=runtime_env(), include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_data_two_actors_equals_local(ray_local, local_run, tiny, work):
    import batch

    start = time.perf_counter()
    summary = batch.run_batch(target_of(tiny), work / "prompts.jsonl", work / "ray", threads=1, workers=2, ray="auto")
    seconds = time.perf_counter() - start
    assert summary.done == 4 and not summary.failures and "2 actors × 1 CPU" in summary.backend
    for png in (work / "local").glob("*.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(work / "ray" / png.name)), np.asarray(Image.open(png)))
    workers = {json.loads(line)["worker"] for line in (work / "ray" / "results.jsonl").read_text().splitlines()}
    assert len(workers) <= 2
    print(f"ray batch of 4: {seconds:.1f} s")


def test_ray_more_actors_than_cpus_is_refused(ray_local, tiny, work):
    import batch
    from registry.policy import InputError

    with pytest.raises(InputError, match=r"need 3 CPUs and the Ray cluster has 2.*use --actors 2"):
        batch.run_batch(target_of(tiny), work / "prompts.jsonl", work / "ray-3", threads=1, workers=3, ray="auto")
    assert not (work / "ray-3").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_two_replicas_of_the_real_app(ray_local, tiny):
    """`stepwise serve --ray`'s deployment: serve/app.py's create_app in two Ray Serve replicas, each loading
    the tiny export; both answer, and a txt2img through Ray gives Pipeline.generate's pixels."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from ray import serve

    import engine
    from serve.app import create_app
    from serve.ray_deploy import deploy

    port = free_port()
    start = time.perf_counter()
    try:
        deploy(create_app, [str(tiny)], replicas=2, threads=1, port=port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stepwise/v1/models", timeout=30) as response:
            models = json.loads(response.read())
        assert [m["loaded"] for m in models] == [True]
        request = {"prompt": "a red apple", "steps": 1, "cfg_scale": 0, "width": 64, "height": 64, "seed": 5}
        post = urllib.request.Request(
            f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(post, timeout=60) as response:
            image = Image.open(io.BytesIO(base64.b64decode(json.loads(response.read())["images"][0])))
        expected = engine.load_pipeline(tiny, threads=1).generate(
            prompt="a red apple", steps=1, guidance=0.0, width=64, height=64, seed=5
        )
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected.image)
        replicas = serve.status().applications["stepwise"].deployments["stepwise"].replica_states
        assert replicas.get("RUNNING") == 2
    finally:
        serve.shutdown()
    print(f"serve: 2 replicas of the app up and answering in {time.perf_counter() - start:.1f} s")
