"""The schedulers package's interface: configs, errors, noise handling, state, and its import boundary."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import schedulers

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = json.loads((ROOT / "registry" / "models.json").read_text())
MODEL_CONFIGS = {model["id"]: model["scheduler"] for model in REGISTRY["models"]}
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SHAPE = (1, 4, 8, 8)

INT_TIMESTEPS = {
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LCMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
}


def run_trajectory(scheduler, steps: int, seed: int = 0, **step_kwargs) -> list[np.ndarray]:
    """Drive a scheduler the way a pipeline does, with seeded random model outputs."""
    rng = np.random.default_rng(seed)
    config = scheduler.config
    mu = {"mu": schedulers.calculate_shift(4096)} if config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(steps, **mu)
    learned = config.get("variance_type") in ("learned", "learned_range")  # DeepFloyd IF: 3 channels in, 6 out
    shape, out_shape = ((1, 3, 8, 8), (1, 6, 8, 8)) if learned else (SHAPE, SHAPE)
    sample = rng.standard_normal(shape, dtype=np.float32) * np.float32(scheduler.init_noise_sigma)
    samples = []
    for t in scheduler.timesteps:
        scheduler.scale_model_input(sample, t)  # the model's input; called for its step-index side effect
        model_output = rng.standard_normal(out_shape, dtype=np.float32)
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
        samples.append(sample)
    return samples


# -- the import boundary ---------------------------------------------------------------------------------


def test_schedulers_work_with_torch_and_diffusers_unimportable():
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import json
        import numpy as np
        import schedulers

        models = json.load(open("registry/models.json"))["models"]
        for model in models:
            config = model["scheduler"]
            scheduler = schedulers.from_config(config)
            kwargs = {"mu": schedulers.calculate_shift(4096)} if config.get("use_dynamic_shifting") else {}
            scheduler.set_timesteps(model["default_steps"], **kwargs)
            learned = config.get("variance_type") == "learned_range"  # DeepFloyd IF: 3 channels in, 6 out
            channels, out_channels = (3, 6) if learned else (4, 4)
            x = np.zeros((1, channels, 4, 4), dtype=np.float32)
            rng = np.random.default_rng(0)
            for t in scheduler.timesteps[:3]:
                out = rng.standard_normal((1, out_channels, 4, 4), dtype=np.float32)
                x = scheduler.step(out, t, scheduler.scale_model_input(x, t), generator=rng).prev_sample
            assert np.isfinite(x).all(), model["id"]
        schedulers.guidance_scale_embedding(np.array([7.0]), 256)
        assert not any(name.split(".")[0] in ("torch", "diffusers") for name in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- configs ---------------------------------------------------------------------------------------------


def test_every_registry_config_builds_its_class():
    for model_id, config in MODEL_CONFIGS.items():
        scheduler = schedulers.from_config(config)
        assert type(scheduler).__name__ == config["_class_name"], model_id
        for key, value in config.items():
            if key in scheduler.defaults:
                assert scheduler.config[key] == value, (model_id, key)


def test_from_config_reads_a_json_file_and_a_folder(tmp_path):
    folder = tmp_path / "model" / "scheduler"
    folder.mkdir(parents=True)
    config = {**MODEL_CONFIGS["sdxl"], "_diffusers_version": "0.19.0.dev0"}
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    for source in (folder / "scheduler_config.json", folder, tmp_path / "model", str(folder)):
        scheduler = schedulers.from_config(source)
        assert isinstance(scheduler, schedulers.EulerDiscreteScheduler)
        assert scheduler.config.timestep_spacing == "leading"
    with pytest.raises(FileNotFoundError):
        schedulers.from_config(tmp_path)


def test_unknown_config_keys_are_ignored_and_defaults_filled():
    scheduler = schedulers.from_config(
        {"_class_name": "EulerDiscreteScheduler", "skip_prk_steps": True, "clip_sample": False, "not_an_option": 3}
    )
    assert "skip_prk_steps" not in scheduler.config and "not_an_option" not in scheduler.config
    assert scheduler.config.timestep_spacing == "linspace"  # diffusers' default for Euler
    assert scheduler.config["beta_schedule"] == "linear"


def test_overrides_and_class_swap():
    config = MODEL_CONFIGS["sdxl"]
    trailing = schedulers.from_config(config, timestep_spacing="trailing")
    trailing.set_timesteps(4)
    np.testing.assert_array_equal(trailing.timesteps, np.array([999, 749, 499, 249], dtype=np.float32))
    assert config["timestep_spacing"] == "leading"  # the caller's dict is untouched

    swapped = schedulers.from_config(config, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    assert isinstance(swapped, schedulers.DPMSolverMultistepScheduler)
    assert swapped.config.beta_schedule == "scaled_linear" and swapped.config.use_karras_sigmas

    # A class's own from_config ignores _class_name, as diffusers' does.
    assert isinstance(schedulers.UniPCMultistepScheduler.from_config(config), schedulers.UniPCMultistepScheduler)


def test_config_is_read_only_and_attribute_readable():
    scheduler = schedulers.from_config(MODEL_CONFIGS["lcm"])
    assert scheduler.config.original_inference_steps == scheduler.config["original_inference_steps"] == 50
    with pytest.raises(AttributeError):
        scheduler.config.timestep_spacing = "trailing"
    with pytest.raises(AttributeError):
        _ = scheduler.config.no_such_option


def test_defaults_are_diffusers_defaults():
    diffusers = pytest.importorskip("diffusers")
    for name, cls in schedulers.SCHEDULERS.items():
        signature = inspect.signature(getattr(diffusers, name).__init__)
        theirs = {key: p.default for key, p in signature.parameters.items() if key != "self"}
        assert set(cls.defaults) == set(theirs), name
        for key, value in cls.defaults.items():
            assert value == theirs[key] or (value != value and theirs[key] != theirs[key]), (name, key)


# -- errors ----------------------------------------------------------------------------------------------


def test_unknown_class_name_is_a_clear_error():
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        schedulers.from_config({"_class_name": "NoSuchScheduler"})
    with pytest.raises(ValueError, match="_class_name"):
        schedulers.from_config({"num_train_timesteps": 1000})


BETA_CLASSES = [name for name, cls in schedulers.SCHEDULERS.items() if "beta_schedule" in cls.defaults]


@pytest.mark.parametrize("name", BETA_CLASSES)
def test_unsupported_beta_schedule(name):
    with pytest.raises(ValueError, match=rf"{name}.*beta_schedule='foo'"):
        schedulers.from_config({"_class_name": name, "beta_schedule": "foo"})


@pytest.mark.parametrize("name", [n for n, cls in schedulers.SCHEDULERS.items() if "timestep_spacing" in cls.defaults])
def test_unsupported_timestep_spacing(name):
    with pytest.raises(ValueError, match=rf"{name}.*timestep_spacing='bar'"):
        schedulers.from_config({"_class_name": name, "timestep_spacing": "bar"})


@pytest.mark.parametrize(
    ("name", "prediction_type"),
    [
        ("DDPMScheduler", "flow_prediction"),
        ("DDIMScheduler", "flow_prediction"),
        ("PNDMScheduler", "sample"),
        ("EulerDiscreteScheduler", "flow_prediction"),
        ("EulerAncestralDiscreteScheduler", "sample"),
        ("HeunDiscreteScheduler", "flow_prediction"),
        ("LCMScheduler", "flow_prediction"),
        ("UniPCMultistepScheduler", "x0"),
        ("DPMSolverMultistepScheduler", "x0"),
    ],
)
def test_unsupported_prediction_type(name, prediction_type):
    with pytest.raises(ValueError, match=rf"{name}.*prediction_type='{prediction_type}'"):
        schedulers.from_config({"_class_name": name, "prediction_type": prediction_type})


@pytest.mark.parametrize(
    ("config", "option"),
    [
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "time_shift_type": "foo"}, "time_shift_type"),
        ({"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "cubic"}, "interpolation_type"),
        ({"_class_name": "DDPMScheduler", "variance_type": "huge"}, "variance_type"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "final_sigmas_type"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}, "solver_order"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "rk4"}, "solver_type"),
        (
            {
                "_class_name": "DPMSolverMultistepScheduler",
                "algorithm_type": "sde-dpmsolver",
                "solver_order": 3,
                "final_sigmas_type": "sigma_min",
            },
            "solver_order",
        ),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}, "final_sigmas_type"),
        ({"_class_name": "UniPCMultistepScheduler", "predict_x0": False}, "final_sigmas_type"),
        ({"_class_name": "UniPCMultistepScheduler", "shift_terminal": 0.1}, "shift_terminal"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_"),
    ],
)
def test_unsupported_option_values(config, option):
    with pytest.raises(ValueError, match=rf"{config['_class_name']}.*{option}"):
        schedulers.from_config(config)


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError, match="timestep_spacinng"):
        schedulers.from_config(MODEL_CONFIGS["sdxl"], timestep_spacinng="trailing")


def test_too_many_steps():
    lcm = schedulers.from_config(MODEL_CONFIGS["lcm"])
    lcm.set_timesteps(50)
    with pytest.raises(ValueError, match="original_inference_steps"):
        lcm.set_timesteps(51)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        lcm.set_timesteps(4, original_inference_steps=2000)
    with pytest.raises(ValueError, match="LCMScheduler"):
        lcm.set_timesteps(30, original_inference_steps=20)
    for name in ("DDPMScheduler", "DDIMScheduler"):
        scheduler = schedulers.from_config({"_class_name": name})
        scheduler.set_timesteps(1000)
        with pytest.raises(ValueError, match=rf"{name}.*num_train_timesteps"):
            scheduler.set_timesteps(1001)


SCHEDULE_INPUTS = {  # what each class's set_timesteps can use besides num_inference_steps
    "DDPMScheduler": {"timesteps"},
    "DDIMScheduler": set(),
    "PNDMScheduler": set(),
    "EulerDiscreteScheduler": {"timesteps", "sigmas"},
    "EulerAncestralDiscreteScheduler": set(),
    "HeunDiscreteScheduler": {"timesteps"},
    "DPMSolverMultistepScheduler": {"timesteps", "mu"},
    "UniPCMultistepScheduler": {"sigmas", "mu"},
    "LCMScheduler": {"timesteps"},
    "FlowMatchEulerDiscreteScheduler": {"timesteps", "sigmas", "mu"},
}


@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
def test_set_timesteps_takes_one_signature_and_refuses_unused_inputs(name):
    assert set(SCHEDULE_INPUTS) == set(schedulers.SCHEDULERS)
    scheduler = schedulers.from_config({"_class_name": name})
    parameters = inspect.signature(scheduler.set_timesteps).parameters
    assert {"num_inference_steps", "timesteps", "sigmas", "mu"} <= set(parameters)
    scheduler.set_timesteps(4, timesteps=None, sigmas=None, mu=None)
    for argument in {"timesteps", "sigmas", "mu"} - SCHEDULE_INPUTS[name]:
        with pytest.raises(ValueError, match=rf"{name}.set_timesteps does not take {argument}"):
            scheduler.set_timesteps(**{argument: [999, 500] if argument != "mu" else 1.0})


def test_dynamic_shifting_needs_mu():
    for model_id in ("flux-dev", "qwen-image"):
        scheduler = schedulers.from_config(MODEL_CONFIGS[model_id])
        with pytest.raises(ValueError, match="mu"):
            scheduler.set_timesteps(4)
    unipc = schedulers.from_config(MODEL_CONFIGS["hidream-i1"], use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        unipc.set_timesteps(4)


def test_misuse_is_reported():
    ddim = schedulers.from_config({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(np.zeros(SHAPE, np.float32), 999, np.zeros(SHAPE, np.float32))
    euler = schedulers.from_config(MODEL_CONFIGS["sdxl"])
    euler.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        euler.step(np.zeros(SHAPE, np.float32), 0, np.zeros(SHAPE, np.float32))
    ancestral = schedulers.from_config(MODEL_CONFIGS["sdxl-turbo"])
    ancestral.set_timesteps(1)
    with pytest.raises(ValueError, match="noise has shape"):
        t = ancestral.timesteps[0]
        ancestral.step(np.zeros(SHAPE, np.float32), t, np.zeros(SHAPE, np.float32), noise=np.zeros((1, 4, 2, 2)))


# -- noise -----------------------------------------------------------------------------------------------

STOCHASTIC = {
    "sdxl-turbo": MODEL_CONFIGS["sdxl-turbo"],
    "lcm": MODEL_CONFIGS["lcm"],
    "ddpm": {"_class_name": "DDPMScheduler"},
    "dpm-sde": {"_class_name": "DPMSolverMultistepScheduler", **SD, "algorithm_type": "sde-dpmsolver++"},
    "flow-stochastic": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "stochastic_sampling": True},
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_seeded_generator_is_reproducible_and_equals_explicit_noise(name):
    config = STOCHASTIC[name]
    first = run_trajectory(schedulers.from_config(config), 6, generator=np.random.default_rng(42))
    second = run_trajectory(schedulers.from_config(config), 6, generator=np.random.default_rng(42))
    other = run_trajectory(schedulers.from_config(config), 6, generator=np.random.default_rng(43))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[-2], other[-2])

    # The generator's draws are standard_normal(shape, float32), one per step that needs noise.
    scheduler = schedulers.from_config(config)
    scheduler.set_timesteps(6)
    rng, noise_rng = np.random.default_rng(0), np.random.default_rng(42)
    with_generator = schedulers.from_config(config)
    with_generator.set_timesteps(6)
    generator = np.random.default_rng(42)
    sample_a = sample_b = rng.standard_normal(SHAPE, dtype=np.float32)
    for t in scheduler.timesteps:
        output = rng.standard_normal(SHAPE, dtype=np.float32)
        last = t == scheduler.timesteps[-1]
        needs_noise = not (name == "lcm" and last) and not (name == "ddpm" and t == 0)
        noise = noise_rng.standard_normal(SHAPE, dtype=np.float32) if needs_noise else None
        sample_a = scheduler.step(output, t, sample_a, noise=noise).prev_sample
        sample_b = with_generator.step(output, t, sample_b, generator=generator).prev_sample
        np.testing.assert_array_equal(sample_a, sample_b)


def test_ddim_eta_uses_noise_only_when_stochastic():
    config = {"_class_name": "DDIMScheduler", **SD}
    deterministic = run_trajectory(schedulers.from_config(config), 5, generator=np.random.default_rng(1))
    again = run_trajectory(schedulers.from_config(config), 5, generator=np.random.default_rng(2))
    np.testing.assert_array_equal(deterministic[-1], again[-1])
    noisy = run_trajectory(schedulers.from_config(config), 5, eta=1.0, generator=np.random.default_rng(1))
    assert not np.array_equal(noisy[-1], deterministic[-1])
    ddim = schedulers.from_config(config)
    ddim.set_timesteps(5)
    with pytest.raises(ValueError, match="either generator or noise"):
        zeros = np.zeros(SHAPE, np.float32)
        ddim.step(zeros, ddim.timesteps[0], zeros, eta=1.0, generator=np.random.default_rng(0), noise=zeros)


# -- state, dtypes, attributes -------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", list(MODEL_CONFIGS))
def test_set_timesteps_resets_state(model_id):
    scheduler = schedulers.from_config(MODEL_CONFIGS[model_id])
    first = run_trajectory(scheduler, 5, generator=np.random.default_rng(0))
    second = run_trajectory(scheduler, 5, generator=np.random.default_rng(0))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
def test_dtypes_and_attributes(name):
    config = {"_class_name": name, **(SD if name != "FlowMatchEulerDiscreteScheduler" else {})}
    scheduler = schedulers.from_config(config)
    scheduler.set_timesteps(8)
    expected = np.int64 if name in INT_TIMESTEPS else np.float32
    assert scheduler.timesteps.dtype == expected
    if hasattr(scheduler, "sigmas"):
        assert scheduler.sigmas.dtype == np.float32
    assert isinstance(scheduler.init_noise_sigma, float)
    assert scheduler.order == (2 if name == "HeunDiscreteScheduler" else 1)
    assert len(scheduler) == 1000

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16):
        scheduler.set_timesteps(8)
        sample = rng.standard_normal(SHAPE).astype(dtype)
        t = scheduler.timesteps[0]
        scaled = scheduler.scale_model_input(sample, t)
        assert scaled.dtype == dtype
        out = scheduler.step(rng.standard_normal(SHAPE).astype(dtype), t, sample, generator=rng)
        assert out.prev_sample.dtype == dtype and out.prev_sample.shape == SHAPE


def test_lcm_returns_denoised_and_euler_pred_original_sample():
    lcm = schedulers.from_config(MODEL_CONFIGS["lcm"])
    lcm.set_timesteps(4)
    np.testing.assert_array_equal(lcm.timesteps, [999, 759, 499, 259])
    sample = np.zeros(SHAPE, np.float32)
    out = lcm.step(np.ones(SHAPE, np.float32), lcm.timesteps[0], sample, generator=np.random.default_rng(0))
    assert out.denoised is not None and out.denoised.shape == SHAPE
    euler = schedulers.from_config(MODEL_CONFIGS["sdxl-lightning"])
    euler.set_timesteps(4)
    np.testing.assert_array_equal(euler.timesteps, np.array([999, 749, 499, 249], dtype=np.float32))
    t = euler.timesteps[0]
    out = euler.step(np.ones(SHAPE, np.float32), t, euler.scale_model_input(sample, t))
    assert out.pred_original_sample is not None


def test_calculate_shift_values():
    assert schedulers.calculate_shift(256) == pytest.approx(0.5)
    assert schedulers.calculate_shift(4096) == pytest.approx(1.15)
    assert schedulers.calculate_shift(4096, 256, 8192, 0.5, 0.9) == pytest.approx(0.5 + 0.4 * 3840 / 7936)


def test_guidance_scale_embedding_shape_and_errors():
    embedding = schedulers.guidance_scale_embedding([0.0, 7.0], 256)
    assert embedding.shape == (2, 256) and embedding.dtype == np.float32
    np.testing.assert_array_equal(embedding[0], np.concatenate([np.zeros(128), np.ones(128)]))  # w=0: sin 0, cos 1
    assert embedding[1, 0] == np.float32(np.sin(np.float32(7000.0)))  # frequency 1 first
    assert schedulers.guidance_scale_embedding(np.zeros(1), 9)[0, -1] == 0.0  # odd dims are zero-padded
    with pytest.raises(ValueError, match="1-D"):
        schedulers.guidance_scale_embedding(np.zeros((1, 1)), 8)
