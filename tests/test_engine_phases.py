"""The engine in phases: the one sampling loop and its callbacks, the load policies, stateless architectures
shared by concurrent generations, and the memory plan.

References: diffusers' pipeline (its scheduler's timesteps, its ``callback_on_step_end`` interrupt, its
images); the resident run for the phased and concurrent ones (the question there is "the same image as
alone", which the parity tests tie to diffusers).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

import engine
import registry
import schedulers
from engine import sampling
from engine.memory import PHASED, RESIDENT, plan_memory
from registry import policy

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red apple on a table"


def test_no_scheduler_class_name_in_the_engine():
    """What a scheduler decodes (LCM: its denoised estimate) is asked of the scheduler, never looked up by name."""
    names = set(schedulers.SCHEDULERS)
    assert "LCMScheduler" in names
    for path in (ROOT / "engine").rglob("*.py"):
        text = path.read_text()
        found = [n for n in names if re.search(rf"\b{n}\b", text)]
        assert not found, f"{path.relative_to(ROOT)} names {found}"


def test_the_loop_exists_once():
    """bench/ runs the engine's own loop: no `scheduler.step(` outside engine/sampling.py and schedulers/."""
    offenders = []
    for package in ("engine", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "sampling.py" and path.parent.name == "engine":
                continue
            if re.search(r"\bsched(uler)?\w*\.step\(", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_lcm_decodes_its_denoised_estimate_and_others_their_sample(monkeypatch):
    """The scheduler says what is decoded; checked against diffusers' LCMScheduler and PNDMScheduler, LCM's
    per-step noise drawn from the same numpy generator on both sides."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_lcm as lcm_module

    draws = {}

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(draws["rng"].standard_normal(tuple(shape), dtype=np.float32))

    monkeypatch.setattr(lcm_module, "randn_tensor", randn_tensor)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)

    def denoise(sample, t):
        return np.tanh(sample) * 0.5

    for model_id in ("lcm", "sd15"):
        config = dict(registry.get(model_id).scheduler)
        ours = schedulers.from_config(config)
        ours.set_timesteps(4)
        got = sampling.sample(denoise, ours, x, rng=np.random.default_rng(5)).latents
        draws["rng"] = np.random.default_rng(5)
        cls = getattr(diffusers, config.pop("_class_name"))
        ref = cls.from_config(config)
        ref.set_timesteps(4)
        latents = torch.from_numpy(x.copy())
        for t in ref.timesteps:
            model_in = ref.scale_model_input(latents, t)
            out = ref.step(torch.tanh(model_in) * 0.5, t, latents)
            latents = out.prev_sample
        expected = out.denoised if model_id == "lcm" else out.prev_sample
        assert np.abs(got - expected.numpy()).max() < 1e-5, model_id


def test_callback_sees_every_step_and_can_stop_the_run():
    config = registry.get("sd15").scheduler
    sched = schedulers.from_config(config)
    sched.set_timesteps(5)
    seen = []

    def watch(step):
        seen.append((step.index, step.total, step.timestep))
        return step.index < 2  # stop after the third step

    x = np.ones((1, 4, 8, 8), np.float32)
    result = sampling.sample(lambda s, t: s * 0.1, sched, x, callback=watch)
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1] == len(sched.timesteps) for s in seen)
    assert [s[2] for s in seen] == [float(t) for t in sched.timesteps[:3]]
    assert result.stopped and result.steps_run == 3


def test_schedule_start_is_diffusers_get_timesteps():
    """strength → the schedule's tail and begin index, as StableDiffusionImg2ImgPipeline.get_timesteps."""
    diffusers = pytest.importorskip("diffusers")
    cases = [("sd15", 10, 0.6), ("sd15", 4, 0.6), ("sdxl-turbo", 2, 0.5)]
    cases += [("sd3-medium", 4, 0.6), ("sd3-medium", 7, 0.35)]
    for model_id, steps, strength in cases:
        config = dict(registry.get(model_id).scheduler)
        ours = schedulers.from_config(config)
        ours.set_timesteps(steps)
        rounding = registry.family(registry.get(model_id).family).strength_steps
        start = sampling.schedule_start(ours, steps, policy.steps_run(steps, strength, rounding))
        ref = getattr(diffusers, config.pop("_class_name")).from_config(config)
        ref.set_timesteps(steps)
        if rounding == "floor":  # StableDiffusion[XL]Img2ImgPipeline.get_timesteps
            t_start = max(steps - min(int(steps * strength), steps), 0)
        else:  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps
            t_start = int(max(steps - min(steps * strength, steps), 0))
        expected = ref.timesteps[t_start * ref.order :].numpy()
        assert np.allclose(ours.timesteps[start:], expected), model_id
        assert ours.begin_index == t_start * ref.order


# --- the memory plan ---------------------------------------------------------------------------------------


class _Manifest:
    def __init__(self, sizes):
        self.components = {name: {"bytes": mb * 2**20} for name, mb in sizes.items()}
        self.data = {"precision": "fp32"}
        self.folder = Path("some-model")

    def weights_bytes(self, names):
        return sum(self.components[n]["bytes"] for n in names)


PHASES = {"encode": ["text_encoder", "text_encoder_2"], "image": [], "denoise": ["unet"], "decode": ["vae_decoder"]}
SIZES = {"text_encoder": 500, "text_encoder_2": 2800, "unet": 10300, "vae_decoder": 200}  # SDXL in fp32, MB


def test_memory_plan_chooses_resident_when_the_whole_fits_else_phased():
    m = _Manifest(SIZES)
    roomy = plan_memory(m, PHASES, available_mb=40_000)
    assert roomy.policy == RESIDENT and roomy.need_mb == roomy.resident_mb
    tight = plan_memory(m, PHASES, available_mb=17_000)  # at 512x512 (no config): ~18.2 GB resident, ~13.4 GB phased
    assert tight.policy == PHASED and tight.need_mb == tight.phased_mb < 17_000 < tight.resident_mb
    assert "largest phase" in tight.reason
    asked = plan_memory(m, PHASES, policy=PHASED, available_mb=40_000)
    assert asked.policy == PHASED and "--low-memory" in asked.reason


def test_memory_plan_refuses_what_fits_under_no_policy():
    m = _Manifest(SIZES)
    with pytest.raises(engine.EngineError, match="phased"):
        plan_memory(m, PHASES, available_mb=12_000)
    with pytest.raises(engine.EngineError, match="--low-memory"):
        plan_memory(m, PHASES, policy=RESIDENT, available_mb=17_000)


# --- on a tiny export ---------------------------------------------------------------------------------------


def _generate(pipe, seed=3, **kwargs):
    args = dict(prompt=PROMPT, steps=2, guidance=7.5, width=64, height=64, seed=seed)
    return pipe.generate(**{**args, **kwargs})


@pytest.mark.slow
def test_phased_gives_the_resident_image_and_releases_every_session(exported_tiny):
    folder = exported_tiny("sd15")
    resident = engine.load_pipeline(folder, threads=1, policy=RESIDENT)
    phased = engine.load_pipeline(folder, threads=1, policy=PHASED)
    assert phased.sessions.loaded() == []  # nothing held between generations
    loads = []
    original = phased.sessions.factory

    def counting(path, threads):
        loads.append(Path(path).parent.name)
        return original(path, threads)

    phased.sessions.factory = counting
    a, b = _generate(resident), _generate(phased)
    assert np.array_equal(a.image, b.image)
    assert phased.sessions.loaded() == []
    assert loads == ["text_encoder", "unet", "vae_decoder"]  # each phase in turn
    assert b.profile["load_ms"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", [RESIDENT, PHASED])
def test_one_pipeline_serves_two_generations_at_once(exported_tiny, policy):
    """Two threads on one loaded pipeline, different prompts and seeds (and a stochastic sampler, whose draws
    must stay each generation's own): each gets the image it gets alone."""
    pipe = engine.load_pipeline(exported_tiny("sdxl", model_id="sdxl-turbo"), threads=1, policy=policy)
    jobs = [
        dict(prompt="a red apple", seed=1, steps=3, guidance=0.0),
        dict(prompt="a blue bird on a branch", seed=2, steps=3, guidance=0.0),
    ]
    alone = [pipe.generate(width=64, height=64, **job) for job in jobs]
    together: list = [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        together[i] = pipe.generate(width=64, height=64, **jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not np.array_equal(alone[0].image, alone[1].image)
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a.image, b.image)
        assert a.warnings == b.warnings
    assert pipe.sessions.loaded() == ([] if policy == PHASED else list(pipe.sessions.paths))


@pytest.mark.slow
def test_architectures_hold_no_generation_state(exported_tiny):
    """Nothing of a generation is written on the pipeline or its architecture."""
    pipe = engine.load_pipeline(exported_tiny("sdxl", model_id="sdxl-turbo"), threads=1)
    before = {k: repr(v) for k, v in vars(pipe.architecture).items()}
    pipe_before = set(vars(pipe))
    _generate(pipe, guidance=0.0)
    assert {k: repr(v) for k, v in vars(pipe.architecture).items()} == before
    assert set(vars(pipe)) == pipe_before


@pytest.mark.slow
def test_a_negative_prompt_without_guidance_is_said_and_not_recorded(exported_tiny):
    """SDXL Turbo runs without CFG: the negative prompt changes nothing, so it is neither run nor written."""
    pipe = engine.load_pipeline(exported_tiny("sdxl", model_id="sdxl-turbo"), threads=1)
    plain = _generate(pipe, guidance=0.0)
    with_negative = _generate(pipe, guidance=0.0, negative_prompt="blurry")
    assert np.array_equal(plain.image, with_negative.image)
    assert with_negative.parameters["negative_prompt"] == ""
    assert any("--negative is ignored" in w for w in with_negative.warnings)
