"""Step policies against the user's steps guide (shared/seed/steps-guide.md), transcribed here by hand.

The expected numbers below are the guide's tables, not the registry's: a registry edit that drifts from
the guide fails here.
"""

import pytest

import registry
from registry import policy
from registry.policy import InputError

# id: (min, default, recommended lo, recommended hi, max useful), from the guide's tables and "press Enter" defaults
GUIDE = {
    "sdxl-turbo": (1, 1, 1, 4, 4),  # "1-4", "Trained for 1-step! More steps = worse!", Enter → 1
    "sdxl-lightning": (4, 4, 4, 8, 8),  # "4-8", "Optimized for 4 steps"
    "lcm": (2, 4, 4, 8, 8),  # "4-8"
    "flux-schnell": (1, 4, 4, 4, 8),  # "4", "Distilled for 4 steps"; "Don't use 20+"
    "sd15": (15, 20, 20, 30, 50),
    "sdxl": (20, 30, 30, 40, 80),
    "sd3-medium": (15, 20, 20, 30, 50),  # Enter → 20
    "sd3.5-large": (20, 28, 28, 40, 60),  # "Steps: 28 ← Good! (or press Enter for default)"
    "qwen-image": (20, 28, 28, 35, 50),  # Enter → 28
    "flux-dev": (20, 30, 30, 50, 100),
    "deepfloyd-if": (30, 50, 50, 100, 150),
    "hidream-i1": (25, 30, 30, 50, 80),
}
# Models the guide does not list: the default is the model card's, the range ours around it (registry/models.json)
CARDS = {
    "hidream-i1-dev": (20, 28, 28, 35, 50),  # HiDream-I1 Dev's card: 28 steps, guidance 0
    "hidream-i1-fast": (12, 16, 16, 20, 28),  # HiDream-I1 Fast's card: 16 steps, guidance 0
}
POLICIES = {**GUIDE, **CARDS}
GUIDE_MENU = {1: "sdxl-turbo", 2: "sd3-medium", 4: "flux-schnell", 5: "sd3.5-large", 6: "qwen-image"}


def test_registry_has_the_twelve_models_of_the_guide_and_the_hidream_variants():
    assert sorted(m.id for m in registry.all_models()) == sorted(POLICIES)
    assert sorted(m.menu for m in registry.all_models()) == list(range(1, 15))
    for menu, model_id in GUIDE_MENU.items():
        assert registry.get(menu).id == model_id


@pytest.mark.parametrize("model_id", sorted(POLICIES))
def test_registry_numbers_match_the_guide(model_id):
    m = registry.get(model_id)
    assert (m.min_steps, m.default_steps, *m.recommended_steps, m.max_useful_steps) == POLICIES[model_id]


@pytest.mark.parametrize("model_id", sorted(POLICIES))
def test_policy_verdicts(model_id):
    lo_min, default, lo, hi, top = POLICIES[model_id]
    m = registry.get(model_id)
    d = policy.decide_steps(m, None)
    assert (d.steps, d.verdict, d.default) == (default, policy.OK, True)
    for n in range(lo, hi + 1):
        assert policy.decide_steps(m, n).verdict == policy.OK
    for n in list(range(lo_min, lo)) + list(range(hi + 1, top + 1)):
        d = policy.decide_steps(m, n)
        assert d.verdict == policy.WARN, n
        assert "better choice" in d.advice
    for n in (lo_min - 1, top + 1, top * 3):
        if n < 1:
            continue
        d = policy.decide_steps(m, n)
        assert d.refused, n
        assert "--force" in d.advice
        assert f"--steps {default}" in d.advice


@pytest.mark.parametrize("model_id", ["sdxl-turbo", "sdxl-lightning", "lcm", "flux-schnell"])
def test_few_step_models_say_more_steps_make_it_worse(model_id):
    m = registry.get(model_id)
    d = policy.decide_steps(m, 20)
    assert d.refused
    assert "worse, not better" in d.advice


def test_turbo_20_steps_names_the_1_to_4_range():
    d = policy.decide_steps(registry.get("sdxl-turbo"), 20)
    assert d.refused and "1-4" in d.advice


def test_too_few_says_blurry_and_too_many_says_wasted():
    assert "blurry" in policy.decide_steps(registry.get("sd3.5-large"), 5).advice
    assert "little or no visible gain" in policy.decide_steps(registry.get("sd3-medium"), 100).advice


@pytest.mark.parametrize("steps", [0, -3])
def test_non_positive_steps_are_bad_input(steps):
    with pytest.raises(InputError, match="at least 1"):
        policy.decide_steps(registry.get("sd15"), steps)


def test_guidance_checks():
    turbo, sd15 = registry.get("sdxl-turbo"), registry.get("sd15")
    assert policy.check_guidance(turbo, None) == 0.0
    assert policy.check_guidance(sd15, None) == 7.5
    assert policy.check_guidance(sd15, 3.0) == 3.0
    with pytest.raises(InputError, match="takes no guidance"):
        policy.check_guidance(turbo, 7.5)
    with pytest.raises(InputError, match="0 or more"):
        policy.check_guidance(sd15, -1)
    # embedded guidance (LCM, FLUX-dev) is a real knob even without CFG
    assert policy.check_guidance(registry.get("flux-dev"), 2.0) == 2.0


def test_size_checks():
    sd15 = registry.get("sd15")
    fam = registry.family("sd15")
    assert policy.check_size(sd15, fam, None, None) == (512, 512)
    assert policy.check_size(sd15, fam, 768, 512) == (768, 512)
    with pytest.raises(InputError, match="multiple of 64"):
        policy.check_size(sd15, fam, 500, 512)
    with pytest.raises(InputError, match="outside"):
        policy.check_size(sd15, fam, 4096, 512)
    flux = registry.get("flux-dev")
    assert policy.check_size(flux, registry.family("flux"), 256, 192) == (256, 192)
    with pytest.raises(InputError, match="multiple of 16"):
        policy.check_size(flux, registry.family("flux"), 250, 192)


def test_seed_and_prompt_checks():
    assert policy.check_seed(None) is None
    assert policy.check_seed(0) == 0
    with pytest.raises(InputError, match="--seed"):
        policy.check_seed(-1)
    with pytest.raises(InputError, match="prompt is empty"):
        policy.check_prompt("   ")
    assert policy.check_prompt(" a cat ") == "a cat"


def test_every_registry_scheduler_is_known_to_the_scheduler_library():
    import schedulers

    for m in registry.all_models():
        assert schedulers.from_config(m.scheduler) is not None, m.id


def test_size_suggestions_stay_inside_the_allowed_range():
    sd15 = registry.get("sd15")
    fam = registry.family("sd15")
    with pytest.raises(InputError, match="outside 64-2048"):
        policy.check_size(sd15, fam, 100000, 512)
    with pytest.raises(InputError, match=r"use --width 1984 or 2048$"):
        policy.check_size(sd15, fam, 2040, 512)
