"""A batch's job list and its results manifest.

``PROMPTS.jsonl`` holds one JSON object per line (``prompt``, ``negative``, ``seed``, ``steps``, ``guidance``,
``size`` or ``width``/``height``, ``scheduler``, ``cache``; a cascade's ``steps_2``, ``steps_3``). Every line is
checked — the same step policy and input checks as ``stepwise generate`` — before anything is loaded or
written. Each line becomes a :class:`Job` with a stable id, ``LINE-HASH`` (the line number and a hash of the
line's content), which names its image.

``DIR/results.jsonl`` lists the finished jobs, one JSON object a line, rewritten atomically after each image
(the image itself is written first, atomically): a rerun skips every job whose entry is there with the same
request and whose image exists, and regenerates the rest.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import schedulers
from registry import requests
from registry.files import atomic_write_text
from registry.policy import InputError

# steps_2 / steps_3: a cascade's later stages (DeepFloyd IF), as generate's --steps-2 / --steps-3
KEYS = (
    *("prompt", "negative", "seed", "steps", "guidance", "size", "width", "height", "scheduler", "cache"),
    *("steps_2", "steps_3"),
)
RESULTS = "results.jsonl"
EXAMPLE = '{"prompt": "a red apple", "seed": 1}'
# The request fields an entry of results.jsonl must match for its job to count as finished.
REQUEST = (
    *("prompt", "negative", "seed", "steps", "guidance", "width", "height", "scheduler", "cache", "model"),
    *("steps_2", "steps_3"),
)


@dataclass(frozen=True)
class Job:
    id: str  # LINE-HASH: the line number (5 digits) and the first 10 hex digits of the line's sha256
    line: int
    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None
    model: str  # the label of the model the batch runs (results made with another are not "finished")
    cache: str | None = None  # the step cache, as registry.cache labels it (fbcache:threshold=0.05)
    steps_2: int | None = None  # a cascade's stage II steps (None: the model has no stage II)
    steps_3: int | None = None  # its stage III steps (None: the export has no stage III)
    warning: str = ""  # the step policy's advice when the steps are outside the recommended range

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    def request(self) -> dict:
        return {key: getattr(self, key) for key in REQUEST}

    def as_dict(self) -> dict:
        return asdict(self)


def _as_keys(message: str) -> str:
    """The policy speaks in the CLI's options (``--steps 4``); a JSONL line's fix is its key (``"steps": 4``)."""
    message = re.sub(r"--steps-([23])\b ?", r'"steps_\1": ', message)
    return re.sub(r"--(steps|guidance|width|height|seed|negative|scheduler|cache)\b ?", r'"\1": ', message)


def _size(raw: dict) -> tuple[int | None, int | None]:
    size = raw.get("size")
    if size is None:
        return raw.get("width"), raw.get("height")
    if "width" in raw or "height" in raw:
        raise InputError('give "size" or "width"/"height", not both')
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, str) and re.fullmatch(r"\s*\d+\s*[xX×]\s*\d+\s*", size):
        w, h = re.split(r"[xX×]", size)
        return int(w), int(h)
    if isinstance(size, list) and len(size) == 2:
        return size[0], size[1]
    raise InputError(f'"size" must be "WIDTHxHEIGHT", one number or [WIDTH, HEIGHT] (got {json.dumps(size)})')


def _typed(raw: dict) -> None:
    """Each key of the right JSON type (a bool is not a number here)."""
    kinds = {
        "prompt": (str,),
        "negative": (str,),
        "scheduler": (str,),
        "cache": (str,),
        "seed": (int,),
        "steps": (int,),
        "steps_2": (int,),
        "steps_3": (int,),
        "width": (int,),
        "height": (int,),
        "guidance": (int, float),
    }
    names = {str: "a string", int: "a whole number", float: "a number"}
    for key, types in kinds.items():
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise InputError(f'"{key}" must be {names[types[-1]]} (got {json.dumps(value)})')


def job_id(line: int, text: str) -> str:
    return f"{line:05d}-{hashlib.sha256(text.strip().encode()).hexdigest()[:10]}"


def plan_item(target, raw: dict, *, force: bool = False) -> dict:
    """One request's checked values, through registry/requests.plan_request as ``stepwise generate`` applies
    them: the prompt, the step policy (refused outside min – max useful unless ``force``), the guidance, the
    size (the export's native size by default), the seed. Raises InputError naming the fix."""
    _typed(raw)
    width, height = _size(raw)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f'"{name}" must be a whole number (got {json.dumps(value)})')
    import cli  # its Target: the export's stages

    # the CLI's and the server's own planning function: the same checks, defaults and refusals
    plan = requests.plan_request(
        target.model,
        target.family,
        prompt=raw.get("prompt"),
        negative=raw.get("negative") or "",
        steps=raw.get("steps"),
        guidance=raw.get("guidance"),
        width=width,
        height=height,
        seed=raw.get("seed"),
        force=force,
        native=target.native_size,
        cache=raw.get("cache"),
        steps_2=raw.get("steps_2"),
        steps_3=raw.get("steps_3"),
        stage_3=cli.has_stage_3(target),
    )
    scheduler = raw.get("scheduler")
    if scheduler is not None and scheduler not in schedulers.SCHEDULERS:
        raise InputError(f"unknown scheduler {scheduler!r}; use one of {', '.join(sorted(schedulers.SCHEDULERS))}")
    return {
        "prompt": plan.prompt,
        "negative": plan.negative,
        "seed": plan.seed if plan.seed_given else None,  # none given: read_jobs derives one from the line
        "steps": plan.steps,
        "guidance": float(plan.guidance),
        "width": plan.width,
        "height": plan.height,
        "scheduler": scheduler,
        "cache": plan.cache.label() if plan.cache else None,
        "steps_2": plan.stage_steps.get("steps_2"),
        "steps_3": plan.stage_steps.get("steps_3"),
        "warning": plan.warning or "",
    }


def read_jobs(path, target, *, force: bool = False) -> list[Job]:
    """Every line of ``path`` checked and planned; the first bad one raises InputError naming the line and
    the fix. A line without a seed gets one drawn from its content hash, so a rerun makes the same image."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; give a JSONL file, one object a line, e.g. {EXAMPLE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); give a UTF-8 JSONL file"
        ) from None
    jobs = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{where} is not JSON ({exc.msg}); write one object a line, e.g. {EXAMPLE}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{where} is not a JSON object; write one object a line, e.g. {EXAMPLE}")
        for key in raw:
            if key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise InputError(f'{where}: unknown key "{key}"; {hint}the keys are {", ".join(KEYS)}')
        try:
            plan = plan_item(target, raw, force=force)
        except InputError as exc:
            raise InputError(f"{where}: {_as_keys(str(exc))}") from None
        ident = job_id(number, text)
        if plan["seed"] is None:
            plan["seed"] = int(ident.split("-")[1][:8], 16)
        plan["warning"] = _as_keys(plan["warning"])
        jobs.append(Job(id=ident, line=number, model=target.label, **plan))
    if not jobs:
        raise InputError(f"{path} holds no prompts; write one JSON object a line, e.g. {EXAMPLE}")
    return jobs


class Results:
    """``DIR/results.jsonl``: the finished jobs, kept in line order and rewritten atomically after each."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / RESULTS
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for number, text in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                if not text.strip():
                    continue
                try:
                    entry = json.loads(text)
                    self.entries[entry["id"]] = entry
                except (ValueError, KeyError, TypeError):
                    raise InputError(
                        f"{self.path} line {number} is not a results entry; delete that line (its image is made "
                        f"again) or give another --out"
                    ) from None

    def finished(self, job: Job) -> bool:
        entry = self.entries.get(job.id)
        if entry is None or not (self.folder / job.file).is_file():
            return False
        return all(entry.get(key) == value for key, value in job.request().items())

    def add(self, job: Job, **extra) -> None:
        self.entries[job.id] = {"id": job.id, "line": job.line, "file": job.file, **job.request(), **extra}
        ordered = sorted(self.entries.values(), key=lambda e: (e.get("line", 0), e["id"]))
        atomic_write_text(self.path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ordered))
