"""serve/'s parts that need no HTTP: AUTOMATIC1111's sampler names, the latent preview, a job's progress."""

import numpy as np
import pytest

import registry
from registry.policy import InputError
from registry.requests import plan_request
from serve import samplers
from serve.worker import Job, preview_rgb


def native(model_id):
    return registry.get(model_id).scheduler


def test_a1111_names_map_to_our_schedulers():
    turbo = native("sdxl-turbo")  # EulerAncestralDiscreteScheduler
    for name in (None, "", "Automatic", "Euler a", "k_euler_a"):
        assert samplers.scheduler_for(name, None, turbo) is None  # the export's own, as generate runs it
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert samplers.scheduler_for("DPM++ 2M Karras", "automatic", turbo) == karras
    assert samplers.scheduler_for("DPM++ 2M", "Karras", turbo) == karras  # A1111 1.9's separate schedule
    assert samplers.scheduler_for("DDIM", None, turbo) == {"_class_name": "DDIMScheduler"}
    assert samplers.scheduler_for("UniPCMultistepScheduler", None, turbo) == {"_class_name": "UniPCMultistepScheduler"}
    flux = native("flux-schnell")  # flow matching: the Euler names mean its own sampler
    assert samplers.scheduler_for("Euler a", None, flux) is None and samplers.scheduler_for("Euler", None, flux) is None
    with pytest.raises(InputError, match="unknown sampler 'Nope'"):
        samplers.scheduler_for("Nope", None, turbo)
    with pytest.raises(InputError, match="unknown scheduler 'Sideways'"):
        samplers.scheduler_for("Euler", "Sideways", turbo)
    names = [s["name"] for s in samplers.listing()]
    assert "Euler a" in names and all(set(s) == {"name", "aliases", "options"} for s in samplers.listing())


@pytest.mark.parametrize(("family", "channels"), [("sd15", 4), ("sdxl", 4), ("flux", 16), ("sd3", 16)])
def test_preview_is_an_rgb_image_of_the_latents_size(family, channels):
    latents = np.random.default_rng(0).standard_normal((1, channels, 12, 8), dtype=np.float32)
    rgb = preview_rgb(latents, family)
    assert rgb.shape == (12, 8, 3) and rgb.dtype == np.uint8 and rgb.std() > 0
    assert preview_rgb(np.full((1, channels, 4, 4), np.nan, np.float32), family).shape == (4, 4, 3)


def test_job_seeds_and_progress():
    m = registry.get("sdxl-turbo")
    plan = plan_request(m, registry.family(m.family), prompt="a cat", steps=4, seed=2**63 - 2)
    job = Job(plan, count=3)
    assert job.seeds == [2**63 - 2, 2**63 - 1, 0]  # wrapped into the policy's seed range
    assert job.progress == 0.0
    job.index, job.step, job.total_steps = 1, 2, 4
    assert job.progress == pytest.approx(0.5)
