"""registry.requests.plan_request: the one planning function the CLI's generate and the server share."""

import pytest

import registry
from registry import policy
from registry.requests import Refused, plan_request


def plan(model_id="sdxl-turbo", **kwargs):
    m = registry.get(model_id)
    return plan_request(m, registry.family(m.family), **{"prompt": "a red apple", **kwargs})


def test_defaults_are_filled_in():
    p = plan(seed=3)
    assert (p.steps, p.guidance, p.width, p.height, p.seed, p.strength) == (1, 0.0, 512, 512, 3, None)
    assert p.decision.default and p.warning is None and p.seed_given
    assert plan(native=(64, 64)).width == 64
    drawn = plan()
    assert not drawn.seed_given and 0 <= drawn.seed < 2**32


def test_refusal_carries_the_policys_advice_and_force_runs_it():
    with pytest.raises(Refused) as exc:
        plan(steps=30)
    decision = policy.decide_steps(registry.get("sdxl-turbo"), 30)
    assert str(exc.value) == f"refused: {decision.advice}"
    assert isinstance(exc.value, policy.InputError)
    forced = plan(steps=30, force=True)
    assert forced.steps == 30 and forced.decision.refused


def test_warning_outside_the_recommended_range():
    p = plan("sd15", steps=40)
    assert p.decision.verdict == policy.WARN and p.warning == p.decision.advice


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"guidance": 7.0}, "takes no guidance"),
        ({"width": 500}, "not a multiple of"),
        ({"seed": -1}, "--seed must be between"),
        ({"threads": 0}, "--threads must be at least 1"),
        ({"strength": 0.5}, "--strength needs --image"),
        ({"inpaint": True}, "--mask needs --image"),
        ({"image_size": (64, 64), "strength": 1.5}, "--strength must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_input_error(kwargs, needle):
    with pytest.raises(policy.InputError) as exc:
        plan(**kwargs)
    assert needle in str(exc.value)


def test_image_to_image_takes_the_images_size_and_the_familys_strength():
    p = plan("sd15", image_size=(200, 130), seed=1)
    assert (p.width, p.height) == (192, 128) and p.strength == 0.8  # SD 1.5 sizes are multiples of 64
    assert p.decision.steps_run == 20 and p.steps == 25  # the default runs the default number of steps
    inpaint = plan("sd15", image_size=(64, 64), inpaint=True, seed=1)
    assert inpaint.strength == 1.0
