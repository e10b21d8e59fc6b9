"""The HTTP server: AUTOMATIC1111's and OpenAI's image APIs over models loaded once (``create_app``).

Every request is planned by ``registry.requests.plan_request`` — the CLI's own checks and step policy — before
it is queued: a refused step count is HTTP 422 with the policy's message, and the server goes on serving. The
image of a request equals ``stepwise generate``'s for the same model, seed and arguments, and its PNG carries
the same metadata. Requests for a model wait in one queue and run one at a time (serve/worker.py).

Errors: AUTOMATIC1111's routes answer ``{"error": KIND, "detail": MESSAGE, "body": "", "errors": ""}``,
OpenAI's ``{"error": {"message", "type", "param", "code"}}``. 400: the body is not JSON (or not a form);
404: unknown model or file; 413: the body or an image is too large; 422: a value is wrong, out of range or
refused by the step policy; 503: the server is shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import registry
from engine.errors import EngineError
from engine.png import parameters_text
from registry.policy import InputError
from registry.requests import Plan, Refused, plan_request

from . import samplers
from .worker import Cancelled, Job, ModelError, ModelWorker, Output, load_workers

log = logging.getLogger("stepwise.serve")
VERSION = "stepwise 0.1.0"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is refused with 413/422 before anything runs."""

    max_images: int = 8  # batch_size x n_iter, or n
    max_prompt_chars: int = 10_000
    max_body_bytes: int = 64 * 2**20
    max_image_pixels: int = 4096 * 4096  # an uploaded image's width x height


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


KINDS = {
    400: "BadRequest",
    404: "NotFound",
    413: "PayloadTooLarge",
    422: "InvalidRequest",
    499: "ClientClosedRequest",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    if request.url.path.startswith("/v1/"):  # OpenAI's shape
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
        body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
    else:  # AUTOMATIC1111's (its FastAPI handlers' shape)
        kind = "Refused" if error.code == "policy_refused" else KINDS.get(error.status, "Error")
        body = {"error": kind, "detail": error.message, "body": "", "errors": ""}
    return JSONResponse(body, status_code=error.status)


class BodyLimit:
    """Pure ASGI: a body over ``limit`` bytes is refused with 413 (by its Content-Length, or as it streams)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = f"the request body is larger than this server's limit of {self.limit // 2**20} MB"
        if length is not None and length.isdigit() and int(length) > self.limit:
            error = ApiError(413, too_large, code="payload_too_large")
            return await _error_response(Request(scope), error)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, too_large, code="payload_too_large")
            return message

        return await self.app(scope, counted, send)


# ---------------------------------------------------------------- request bodies


class A1111Request(BaseModel):
    """The fields of AUTOMATIC1111's txt2img/img2img payloads that Stepwise reads; the rest are ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str | None = ""
    steps: int | None = None  # None: the model's default
    cfg_scale: float | None = None  # None: the model's default
    width: int | None = None
    height: int | None = None
    seed: int | None = -1  # -1: random
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None  # A1111 1.9's schedule: automatic, uniform, karras, exponential
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float | None = None
    init_images: list[str] | None = None
    mask: str | None = None
    override_settings: dict | None = None
    model: str | None = None  # Stepwise's: the model, as override_settings.sd_model_checkpoint
    send_images: bool = True
    save_images: bool = False
    force: bool = False  # Stepwise's: run a step count the policy refuses (the CLI's --force)
    cache: str | None = None  # Stepwise's: a step cache, MODE[:key=value,...] (the CLI's --cache)


class OpenAIRequest(BaseModel):
    """``/v1/images/generations`` (JSON) and ``/v1/images/edits`` (form); Stepwise's own fields via extra_body."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None  # "WxH" or "auto"
    response_format: str | None = None  # b64_json (default) or url
    negative_prompt: str | None = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None
    strength: float | None = None  # edits
    force: bool = False
    cache: str | None = None  # a step cache, MODE[:key=value,...] (the CLI's --cache)


def _validated(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
        param = ".".join(str(p) for p in errors[0]["loc"]) if errors and errors[0]["loc"] else None
        raise ApiError(422, "; ".join(parts), param=param) from None


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


# ---------------------------------------------------------------- the server's state


class ServerState:
    def __init__(self, workers: dict[str, ModelWorker], out_dir: Path, limits: Limits):
        self.workers = workers
        self.default = next(iter(workers))
        self.out_dir = out_dir
        self.limits = limits
        self.closing = False

    def worker(self, name: str | None) -> ModelWorker:
        """A model by its id, its A1111 title ("id [hash]"), its --model spec or its folder; None: the default."""
        if name is None or not str(name).strip():
            return self.workers[self.default]
        name = str(name).strip()
        base = re.sub(r"\s*\[[^\]]*\]$", "", name)
        for w in self.workers.values():
            if name in (w.id, w.spec, str(w.target.folder)) or base == w.id:
                return w
        known = ", ".join(self.workers)
        raise ApiError(404, f"unknown model {name!r}; this server has {known}", param="model", code="model_not_found")

    def running(self, model: str | None = None) -> tuple[ModelWorker | None, Job | None]:
        workers = [self.worker(model)] if model else list(self.workers.values())
        busy = [(w, w.running) for w in workers if w.running is not None]
        if not busy:
            return (workers[0] if model else None), None
        return min(busy, key=lambda pair: pair[1].started or 0)

    def begin_shutdown(self, cancel_running: bool) -> None:
        """Refuse new requests and drop the waiting ones; the running ones finish unless ``cancel_running``."""
        self.closing = True
        for w in self.workers.values():
            w.cancel_all("the server is shutting down", running=cancel_running)

    def close(self) -> None:
        self.closing = True
        for w in self.workers.values():
            w.close()

    def save(self, png: bytes, model: str, seed: int) -> str:
        """Write a PNG into the output folder (and only there); its file name."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "-", model)[:60] or "image"
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{seed}-{uuid.uuid4().hex[:8]}.png"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        from registry.files import atomic_write

        atomic_write(path, lambda f: f.write(png))
        return name

    def file(self, name: str) -> Path:
        if not FILE_NAME.match(name):
            raise ApiError(404, f"no file {name!r} here")
        root = self.out_dir.resolve()
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():
            raise ApiError(404, f"no file {name!r} here")
        return path


# ---------------------------------------------------------------- planning and running one request


def _decode_image(data: str | bytes, what: str, limits: Limits, mode: str | None = "RGB"):
    from PIL import Image

    from engine.images import image_from_bytes

    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, f"{what} is not base64 (a PNG or JPEG, base64-encoded)", param=what) from None
    try:
        with Image.open(io.BytesIO(data)) as peek:
            w, h = peek.size
    except Exception:
        w = h = 0  # not an image: image_from_bytes says so
    if w * h > limits.max_image_pixels:
        side = int(limits.max_image_pixels**0.5)
        raise ApiError(413, f"{what} is {w}x{h}: larger than this server's {side}x{side}", param=what)
    try:
        return image_from_bytes(data, what, mode)
    except EngineError as exc:
        raise ApiError(422, str(exc), param=what) from None


def _plan(worker: ModelWorker, limits: Limits, *, prompt, count, image=None, mask=None, seed=None, **kwargs) -> Plan:
    if prompt is not None and len(prompt) > limits.max_prompt_chars:
        raise ApiError(
            422, f"the prompt is {len(prompt)} characters; at most {limits.max_prompt_chars}", param="prompt"
        )
    if not 1 <= count <= limits.max_images:
        raise ApiError(422, f"{count} images asked for; between 1 and {limits.max_images} a request", param="n")
    try:
        return plan_request(
            worker.model,
            worker.family,
            prompt=prompt,
            seed=seed,
            native=worker.target.native_size,
            image_size=image.size if image is not None else None,
            inpaint=mask is not None,
            steps_2=worker.steps_2,
            steps_3=worker.steps_3,
            stage_3=worker.stage_3,
            **kwargs,
        )
    except Refused as exc:
        raise ApiError(422, str(exc), param="steps", code="policy_refused") from None
    except InputError as exc:
        raise ApiError(422, str(exc)) from None


async def _run(state: ServerState, request: Request, worker: ModelWorker, job: Job) -> Output:
    """Queue the job and wait for it; a client that goes away cancels it (its slot is freed at the next step)."""
    if state.closing:
        raise ApiError(503, "the server is shutting down; send the request again once it is back")
    future = worker.submit(job)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when answered early
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=0.25)
            if future.done():
                break
            if job.cancel.is_set():  # the server is stopping: answered now, the worker drops it at its next step
                raise ApiError(503, f"the request was cancelled: {job.why_cancelled}")
            if await request.is_disconnected():
                job.cancel.set()
                raise ApiError(499, "the client went away; the request was cancelled")
    except asyncio.CancelledError:
        job.cancel.set()
        raise
    try:
        return future.result()
    except Cancelled as exc:
        raise ApiError(503, f"the request was cancelled: {exc}") from None
    except (InputError, EngineError) as exc:
        raise ApiError(422, str(exc)) from None


def _scheduler(worker: ModelWorker, sampler: str | None, schedule: str | None):
    try:
        return samplers.scheduler_for(sampler, schedule, worker.scheduler_config)
    except InputError as exc:
        raise ApiError(422, str(exc), param="sampler_name") from None


def _info(worker: ModelWorker, job: Job, out: Output, kind: str, extra: dict | None = None) -> dict:
    plan, results = job.plan, out.results
    made = len(results)
    warnings = ([plan.warning] if plan.warning else []) + [w for r in results[:1] for w in r.warnings]
    first = results[0].parameters if results else {}
    return {
        "prompt": plan.prompt,
        "all_prompts": [plan.prompt] * made,
        "negative_prompt": plan.negative,
        "all_negative_prompts": [plan.negative] * made,
        "seed": job.seeds[0],
        "all_seeds": job.seeds[:made],
        "subseed": -1,
        "all_subseeds": [-1] * made,
        "subseed_strength": 0,
        "width": plan.width,
        "height": plan.height,
        "sampler_name": first.get("sampler"),
        "cfg_scale": plan.guidance,
        "steps": plan.steps,
        "batch_size": job.count,
        "denoising_strength": plan.strength,
        "sd_model_name": worker.id,
        "sd_model_hash": None,
        "index_of_first_image": 0,
        "infotexts": [parameters_text({**r.parameters, **(worker.extra or {})}) for r in results],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "version": VERSION,
        "styles": [],
        "extra_generation_params": {},
        "profiles": [r.profile for r in results],
        "stepwise": {
            "job": kind,
            "model": worker.id,
            "steps_run": plan.decision.steps_run,
            "verdict": plan.decision.verdict,
            "advice": plan.decision.advice,
            "warnings": warnings,
            "interrupted": out.interrupted,
            "parameters": [{**r.parameters, **(worker.extra or {})} for r in results],
            **(extra or {}),
        },
    }


# ---------------------------------------------------------------- the app


def create_app(
    models: list[str],
    *,
    threads: int | None = None,
    out_dir: str | Path | None = None,
    low_memory: bool = False,
    preload: bool = True,
    limits: Limits | None = None,
    workers: dict[str, ModelWorker] | None = None,
    page: bool = True,
    steps_2: int | None = None,
    steps_3: int | None = None,
) -> FastAPI:
    """The server for ``models`` (registry ids or export folders, as the CLI's ``--model``): each pipeline is
    loaded once (now, unless ``preload`` is False: on its first request) and kept, resident (``low_memory``:
    phased). ``out_dir``: where images asked for by URL or with ``save_images`` are written (default
    ``$STEPWISE_HOME/outputs``); the server writes nowhere else. ``workers``: already built ModelWorkers (a Ray
    replica that built its own). ``page``: serve the web page at ``/`` (serve/page.py) where it is installed.
    ``steps_2``/``steps_3``: a cascade's stage II/III steps for every request (generate's ``--steps-2``/
    ``--steps-3``; default: each stage's own). Raises ``ModelError`` (one line) for a model it cannot serve."""
    limits = limits or Limits()
    workers = workers or load_workers(
        list(models), threads=threads, low_memory=low_memory, steps_2=steps_2, steps_3=steps_3
    )
    if preload:
        for w in workers.values():
            try:
                w.load()
            except (EngineError, InputError) as exc:
                raise ModelError(f"{w.spec}: {exc}") from None
    state = ServerState(workers, Path(out_dir) if out_dir else registry.stepwise_home() / "outputs", limits)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.close()

    app = FastAPI(title="Stepwise", version=VERSION.split()[-1], lifespan=lifespan)
    app.state.stepwise = state
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: said in the dialect's shape, and logged
        log.exception("unexpected error in %s", request.url.path)
        return _error_response(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        return _error_response(request, ApiError(422, "; ".join(parts)))

    # ------------------------------------------------------------ AUTOMATIC1111

    async def a1111(request: Request, kind: str):
        body = await _json_body(request)
        req = _validated(A1111Request, body)
        worker = state.worker(req.model or (req.override_settings or {}).get("sd_model_checkpoint"))
        image = mask = None
        strength = None
        if kind == "img2img":
            if not req.init_images:
                raise ApiError(422, "img2img needs init_images: a base64 PNG or JPEG", param="init_images")
            image = _decode_image(req.init_images[0], "init_images[0]", limits)
            mask = _decode_image(req.mask, "mask", limits) if req.mask else None
            strength = req.denoising_strength
        if req.batch_size < 1 or req.n_iter < 1:
            raise ApiError(422, "batch_size and n_iter must be at least 1", param="batch_size")
        plan = _plan(
            worker,
            limits,
            prompt=req.prompt,
            count=req.batch_size * req.n_iter,
            image=image,
            mask=mask,
            negative=req.negative_prompt or "",
            steps=req.steps,
            guidance=req.cfg_scale,
            width=req.width,
            height=req.height,
            seed=None if req.seed is None or req.seed == -1 else req.seed,
            strength=strength,
            force=req.force,
            cache=req.cache,
        )
        scheduler = _scheduler(worker, req.sampler_name or req.sampler_index, req.scheduler)
        job = Job(plan, req.batch_size * req.n_iter, scheduler, image, mask, kind=kind)
        out = await _run(state, request, worker, job)
        extra = {}
        if req.save_images:
            extra["files"] = [
                state.save(png, worker.id, seed) for png, seed in zip(out.pngs, job.seeds[: len(out.pngs)], strict=True)
            ]
        images = [base64.b64encode(png).decode() for png in out.pngs] if req.send_images else []
        parameters = {**body, "init_images": None, "mask": None} if kind == "img2img" else body
        return {"images": images, "parameters": parameters, "info": json.dumps(_info(worker, job, out, kind, extra))}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await a1111(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await a1111(request, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False, model: str | None = None):
        worker, job = state.running(model)
        queued = {w.id: len(w.waiting) for w in state.workers.values()}
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": _state(None),
                "current_image": None,
                "textinfo": None,
                "stepwise": {"model": worker.id if worker else None, "queued": queued},
            }
        elapsed = time.time() - (job.started or time.time())
        done = job.progress
        step_s = worker.step_seconds(job.plan.width, job.plan.height)
        if done > 0:
            eta = elapsed / done - elapsed
        else:
            eta = step_s * job.plan.decision.steps_run * job.count if step_s else 0.0
        preview = None if skip_current_image else worker.preview()
        total = job.total_steps or job.plan.decision.steps_run
        return {
            "progress": round(done, 4),
            "eta_relative": round(max(eta, 0.0), 3),
            "state": _state(job),
            "current_image": base64.b64encode(preview).decode() if preview else None,
            "textinfo": f"{worker.id}: step {job.step} of {total}, image {job.index + 1} of {job.count}",
            "stepwise": {
                "model": worker.id,
                "queued": queued,
                "seed": job.seeds[job.index] if job.index < job.count else None,
                "step_ms": list(job.step_ms),
                "step_s": step_s,
                "elapsed_s": round(elapsed, 3),
            },
        }

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(model: str | None = None):
        workers = [state.worker(model)] if model else list(state.workers.values())
        for w in workers:
            if w.running is not None:
                w.running.interrupt.set()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip(model: str | None = None):
        return await interrupt(model)

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [
            {
                "title": w.id,
                "model_name": w.id,
                "hash": None,
                "sha256": None,
                "filename": str(w.target.folder),
                "config": None,
            }
            for w in state.workers.values()
        ]

    @app.get("/sdapi/v1/samplers")
    async def sampler_list():
        return samplers.listing()

    @app.get("/sdapi/v1/schedulers")
    async def schedule_list():
        return samplers.schedules()

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": state.default, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await _json_body(request)
        if "sd_model_checkpoint" in body:
            state.default = state.worker(body["sd_model_checkpoint"]).id
        return None

    # ------------------------------------------------------------ Stepwise's own

    @app.get("/stepwise/v1/models")
    async def models():
        return [w.describe() for w in state.workers.values()]

    @app.get("/files/{name}")
    async def files(name: str):
        return FileResponse(state.file(name), media_type="image/png")

    # ------------------------------------------------------------ OpenAI

    async def openai(request: Request, req: OpenAIRequest, image=None, mask=None):
        worker = state.worker(req.model)
        width = height = None
        if req.size not in (None, "", "auto"):
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", req.size.strip())
            if not match:
                raise ApiError(422, f"size {req.size!r} is not WIDTHxHEIGHT (e.g. 512x512) or auto", param="size")
            width, height = int(match[1]), int(match[2])
        fmt = req.response_format or "b64_json"
        if fmt not in ("b64_json", "url"):
            raise ApiError(422, f"response_format {fmt!r}: use b64_json or url", param="response_format")
        plan = _plan(
            worker,
            limits,
            prompt=req.prompt,
            count=req.n,
            image=image,
            mask=mask,
            negative=req.negative_prompt or "",
            steps=req.steps,
            guidance=req.guidance,
            width=width,
            height=height,
            seed=req.seed,
            strength=req.strength,
            force=req.force,
            cache=req.cache,
        )
        scheduler = _scheduler(worker, req.sampler, None)
        kind = "txt2img" if image is None else "img2img"
        job = Job(plan, req.n, scheduler, image, mask, kind=kind)
        out = await _run(state, request, worker, job)
        data = []
        for png, seed in zip(out.pngs, job.seeds[: len(out.pngs)], strict=True):
            if fmt == "url":
                data.append({"url": f"{str(request.base_url).rstrip('/')}/files/{state.save(png, worker.id, seed)}"})
            else:
                data.append({"b64_json": base64.b64encode(png).decode()})
        info = _info(worker, job, out, kind)
        return {"created": int(time.time()), "data": data, "stepwise": info}

    @app.get("/v1/models")
    async def openai_models():
        return {
            "object": "list",
            "data": [
                {"id": w.id, "object": "model", "created": 0, "owned_by": "stepwise"} for w in state.workers.values()
            ],
        }

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await openai(request, _validated(OpenAIRequest, await _json_body(request)))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        try:
            form = await request.form(max_files=8, max_fields=64)
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(400, f"the request body is not a multipart form ({exc})") from None
        fields, uploads = {}, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                uploads.setdefault(key.removesuffix("[]"), await value.read())
            else:
                fields[key] = value
        if "image" not in uploads:
            raise ApiError(422, "edits need an image file (multipart field 'image')", param="image")
        req = _validated(OpenAIRequest, fields)
        image = _decode_image(uploads["image"], "image", limits, mode=None)
        mask = _openai_mask(
            _decode_image(uploads["mask"], "mask", limits, mode=None) if "mask" in uploads else None, image
        )
        return await openai(request, req, image.convert("RGB"), mask)

    if page:
        try:  # the web page (serve/page.py, its own branch): GET / and /static/
            from .page import mount_page
        except ImportError:
            mount_page = None
        if mount_page is not None:
            mount_page(app)
    return app


def _state(job: Job | None) -> dict:
    return {
        "skipped": False,
        "interrupted": bool(job and job.interrupt.is_set()),
        "stopping_generation": False,
        "job": job.kind if job else "",
        "job_count": job.count if job else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
        "job_no": job.index if job else 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": (job.total_steps or job.plan.decision.steps_run) if job else 0,
    }


def _openai_mask(mask, image):
    """OpenAI's mask: its fully transparent pixels are edited (no mask: the image's own transparent pixels);
    a mask without alpha is read as Stepwise's (white is repainted). → an RGB mask, white repainted, or None."""
    source = mask if mask is not None else image
    if "A" in source.getbands() or "transparency" in source.info:
        alpha = source.convert("RGBA").getchannel("A")
        if mask is None and alpha.getextrema()[0] > 0:
            return None  # an opaque image and no mask: image-to-image
        return alpha.point(lambda a: 255 if a == 0 else 0).convert("RGB")
    if mask is None:
        return None
    return mask.convert("RGB") if mask.mode != "RGB" else mask


__all__ = ["A1111Request", "ApiError", "Limits", "OpenAIRequest", "ServerState", "create_app"]
