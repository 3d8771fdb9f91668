"""Pure tests for the request schema, the worker's limits, errors and settings: no model, no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from worker.errors import InvalidRequest, JobError
from worker.limits import Limits
from worker.schema import InpaintRequest, parse_request
from worker.settings import Settings

BASE = {"prompt": "a red sofa", "image": "image.png", "mask_image": "mask.png"}


def request(**overrides) -> dict:
    """A minimal valid request with some fields changed; a value of None drops the field."""
    data = {**BASE, **overrides}
    return {key: value for key, value in data.items() if value is not None}


def rejects(data, field: str, *words: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(data)
    error = caught.value
    assert error.code == "invalid_request"
    assert error.field == field, error.message
    assert error.to_dict()["field"] == field
    assert error.to_dict()["code"] == "invalid_request"
    for word in words:
        assert word.lower() in error.message.lower(), (word, error.message)
    return error


INVALID = [
    pytest.param(request(colour="red"), "colour", ["unknown field"], id="unknown-field"),
    pytest.param(request(strength="strong"), "strength", ["valid number", "strong"], id="strength-as-string"),
    pytest.param(
        request(num_inference_steps="2.5"), "num_inference_steps", ["valid integer", "2.5"], id="steps-as-float-string"
    ),
    pytest.param(
        request(num_inference_steps=2.5),
        "num_inference_steps",
        ["valid integer", "2.5"],
        id="steps-as-fractional-number",
    ),
    pytest.param(request(padding_mask_crop=False), "padding_mask_crop", ["valid integer", "False"],
                 id="padding-mask-crop-false"),
    pytest.param(request(num_inference_steps=True), "num_inference_steps", ["valid integer", "True"],
                 id="steps-as-boolean"),
    pytest.param(request(seed="7"), "seed", ["valid integer", "'7'"], id="seed-as-string"),
    pytest.param(request(true_cfg_scale=math.inf), "true_cfg_scale", ["finite number"], id="infinite-cfg-scale"),
    pytest.param(request(guidance_scale=math.nan), "guidance_scale", ["finite number"], id="nan-guidance-scale"),
    pytest.param(request(guidance_scale=-1.0), "guidance_scale", ["greater than or equal to 0"],
                 id="negative-guidance-scale"),
    pytest.param(request(attention_kwargs={"scale": math.inf}), "attention_kwargs.scale", ["finite number"],
                 id="infinite-lora-scale"),
    pytest.param(request(attention_kwargs={"scale": True}), "attention_kwargs.scale", ["finite number", "True"],
                 id="boolean-lora-scale"),
    pytest.param(request(plugins={"mask": "yes"}), "plugins.mask", ["valid boolean", "yes"],
                 id="plugin-switch-as-string"),
    pytest.param(request(image=["a.png", "b.png"]), "image", ["valid string"], id="image-list"),
    pytest.param(request(output={"prefix": "../other"}), "output.prefix", ["'..'"], id="prefix-climbing-up"),
    pytest.param(request(output={"prefix": "a//b"}), "output.prefix", ["empty"], id="prefix-empty-segment"),
    pytest.param(
        request(prompt=None), "prompt", ["exactly one of prompt or prompt_embeds"], id="neither-prompt-nor-embeds"
    ),
    pytest.param(
        request(prompt_embeds="embeds.safetensors"),
        "prompt",
        ["exactly one of prompt or prompt_embeds"],
        id="both-prompt-and-embeds",
    ),
    pytest.param(
        request(negative_prompt="blurry", negative_prompt_embeds="neg.safetensors"),
        "negative_prompt",
        ["at most one of negative_prompt or negative_prompt_embeds"],
        id="both-negative-prompt-and-embeds",
    ),
    pytest.param(request(prompt=[]), "prompt", ["empty"], id="empty-prompt-list"),
    pytest.param(
        request(prompt=["a", "b"], negative_prompt=["blurry"]),
        "negative_prompt",
        ["1 entries for 2 prompts", "one each"],
        id="negative-prompt-list-wrong-length",
    ),
    pytest.param(
        request(prompt_embeds_mask="mask.safetensors"),
        "prompt_embeds_mask",
        ["needs prompt_embeds"],
        id="embeds-mask-without-embeds",
    ),
    pytest.param(
        request(negative_prompt_embeds_mask="mask.safetensors"),
        "negative_prompt_embeds_mask",
        ["needs negative_prompt_embeds"],
        id="negative-embeds-mask-without-embeds",
    ),
    pytest.param(request(strength=0), "strength", ["greater than 0"], id="strength-zero"),
    pytest.param(request(strength=-0.5), "strength", ["greater than 0"], id="strength-negative"),
    pytest.param(request(strength=1.5), "strength", ["less than or equal to 1"], id="strength-over-one"),
    pytest.param(
        request(strength=1e-20),
        "strength",
        ["leaves no step to run", "raise strength"],
        id="strength-too-small-for-any-step",
    ),
    pytest.param(
        request(num_inference_steps=0), "num_inference_steps", ["greater than or equal to 1"], id="steps-zero"
    ),
    pytest.param(
        request(num_inference_steps=3, sigmas=[1.0, 0.5]),
        "sigmas",
        ["2 values", "num_inference_steps is 3", "one sigma per step"],
        id="sigmas-wrong-length",
    ),
    pytest.param(
        request(num_inference_steps=3, sigmas=[1.0, 0.5, 0.5]),
        "sigmas",
        ["strictly decreasing"],
        id="sigmas-not-decreasing",
    ),
    pytest.param(
        request(num_inference_steps=2, sigmas=[0.4, 0.9]), "sigmas", ["strictly decreasing"], id="sigmas-increasing"
    ),
    pytest.param(request(num_inference_steps=2, sigmas=[1.5, 0.5]), "sigmas", ["(0, 1]"], id="sigma-over-one"),
    pytest.param(request(num_inference_steps=2, sigmas=[1.0, 0.0]), "sigmas", ["(0, 1]"], id="sigma-zero"),
    pytest.param(request(sigmas=[]), "sigmas", ["empty"], id="sigmas-empty"),
    pytest.param(
        request(prompt=["a", "b"], num_images_per_prompt=2, seed=[1, 2, 3]),
        "seed",
        ["3 seeds for 4 images", "one seed per image"],
        id="seed-list-wrong-length",
    ),
    pytest.param(request(seed=[1, 2]), "seed", ["2 seeds for 1 images"], id="seed-list-too-long"),
    pytest.param(request(seed=-1), "seed", ["[0, 2**63)", "-1"], id="seed-negative"),
    pytest.param(request(seed=[5, -1], num_images_per_prompt=2), "seed", ["[0, 2**63)"], id="seed-negative-in-list"),
    pytest.param(request(seed=2**63), "seed", ["[0, 2**63)"], id="seed-too-large"),
    pytest.param(
        request(max_sequence_length=1025),
        "max_sequence_length",
        ["less than or equal to 1024"],
        id="max-sequence-length-1025",
    ),
    pytest.param(
        request(padding_mask_crop=0),
        "padding_mask_crop",
        ["0 would still crop", "bounding box", "null for no cropping", "> 0"],
        id="padding-mask-crop-zero",
    ),
    pytest.param(
        request(padding_mask_crop=-8), "padding_mask_crop", ["greater than 0"], id="padding-mask-crop-negative"
    ),
    pytest.param(
        request(padding_mask_crop=32, output_type="latent"),
        "padding_mask_crop",
        ["output_type 'latent'"],
        id="padding-mask-crop-with-latent",
    ),
    pytest.param(
        request(output_type="gif"),
        "output_type",
        ["'png'", "'jpeg'", "'webp'", "'latent'", "gif"],
        id="output-type-gif",
    ),
    pytest.param(
        request(attention_kwargs={"dropout": 0.1}),
        "attention_kwargs",
        ["unknown keys", "dropout", "allowed", "scale"],
        id="attention-kwargs-unknown-key",
    ),
    pytest.param(
        request(attention_kwargs={"scale": "high"}),
        "attention_kwargs.scale",
        ["scale", "must be a finite number", "high"],
        id="attention-kwargs-scale-not-number",
    ),
    pytest.param(request(job_id="my job"), "job_id", ["pattern"], id="job-id-with-space"),
    pytest.param(request(job_id="a" * 129), "job_id", ["pattern", "127"], id="job-id-too-long"),
    pytest.param(request(job_id="-leading-dash"), "job_id", ["pattern"], id="job-id-leading-dash"),
    pytest.param(
        request(prompt=["a", "b", "c"], mask_image=["m1", "m2"]),
        "mask_image",
        ["valid string"],
        id="mask-list",
    ),
    pytest.param(request(height=0), "height", ["greater than 0"], id="height-zero"),
    pytest.param(request(deadline_s=0), "deadline_s", ["greater than 0"], id="deadline-zero"),
    pytest.param(
        request(output={"quality": 101}), "output.quality", ["less than or equal to 100"], id="output-quality-over-100"
    ),
    pytest.param(request(image=None), "image", ["required"], id="image-missing"),
    pytest.param([BASE], "request", ["JSON object", "list"], id="request-is-a-list"),
    pytest.param(request(prompt="a cat \ud83d"), "prompt", ["character 7", "surrogate", "whole characters"],
                 id="prompt-cut-inside-an-emoji"),
    pytest.param(request(prompt=["a cat", "a \udc00dog"]), "prompt.1", ["surrogate"], id="half-character-in-a-list"),
    pytest.param(request(plugins={"x\ud800": {}}), "plugins", ["a key", "surrogate"], id="half-character-in-a-key"),
    pytest.param(request(prompt=json.loads("[" * 500 + "]" * 500)), "prompt", ["nested over 20 levels"],
                 id="nested-500-levels-deep"),
    pytest.param(request(plugins={"x": json.loads('{"a":' * 40 + "1" + "}" * 40)}), "plugins",
                 ["nested over 20 levels"], id="plugin-options-nested-deep"),
    pytest.param(request(prompt="pear " * 4001), "prompt", ["20005 characters", "cap of 20000"],
                 id="prompt-over-the-character-cap"),
    pytest.param(request(negative_prompt=["ok", "x" * 20001]), "negative_prompt", ["entry 1", "cap of 20000"],
                 id="negative-prompt-over-the-character-cap"),
    pytest.param(request(prompt=["a"] * 1001), "prompt", ["1001 prompts", "at most 1000"], id="too-many-prompts"),
    pytest.param(request(image="s3://inputs/" + "k" * 5000), "image", ["at most 4096"], id="reference-too-long"),
    pytest.param(request(true_cfg_scale=1e308), "true_cfg_scale", ["at most 100", "overflows"],
                 id="cfg-scale-that-overflows"),
    pytest.param(request(attention_kwargs={"scale": 1e300}), "attention_kwargs.scale", ["-100 to 100"],
                 id="lora-scale-that-overflows"),
    pytest.param("prompt=a", "request", ["JSON object", "str"], id="request-is-a-string"),
]


@pytest.mark.parametrize(("data", "field", "words"), INVALID)
def test_invalid_request_names_field_and_what_is_allowed(data, field, words):
    error = rejects(data, field, *words)
    assert str(error).startswith("invalid_request: ")
    assert error.message.startswith(f"{field}: ")


UNION_TYPE_ERRORS = [
    pytest.param(request(prompt=5), "prompt", id="prompt-as-int"),
    pytest.param(request(seed="lucky"), "seed", id="seed-as-string"),
    pytest.param(request(image=5), "image", id="image-as-int"),
]


HUGE = 10**400  # valid JSON; too large for a float


@pytest.mark.parametrize(("overrides", "field"), [
    ({"num_inference_steps": HUGE}, "num_inference_steps"),
    ({"num_images_per_prompt": HUGE}, "num_images_per_prompt"),
    ({"seed": HUGE}, "seed"),
    ({"seed": [HUGE]}, "seed"),
    ({"height": HUGE}, "height"),
    ({"width": HUGE}, "width"),
    ({"padding_mask_crop": HUGE}, "padding_mask_crop"),
    ({"preview_every": HUGE}, "preview_every"),
    ({"max_sequence_length": HUGE}, "max_sequence_length"),
    ({"deadline_s": HUGE}, "deadline_s"),
    ({"strength": HUGE}, "strength"),
    ({"true_cfg_scale": HUGE}, "true_cfg_scale"),
    ({"guidance_scale": HUGE}, "guidance_scale"),
    ({"sigmas": [HUGE]}, "sigmas.0"),
    ({"output": {"quality": HUGE}}, "output.quality"),
    ({"attention_kwargs": {"scale": HUGE}}, "attention_kwargs.scale"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_number_too_large_for_a_float_is_an_invalid_request_naming_its_field(overrides, field):
    error = rejects(request(**overrides), field)
    assert "0" * 80 not in error.message  # named by its size, not printed


def test_num_inference_steps_has_a_generous_bound_and_says_so():
    assert parse_request(request(num_inference_steps=1000)).num_inference_steps == 1000
    rejects(request(num_inference_steps=1001), "num_inference_steps", "at most 1000", "generous", "got 1001")


@pytest.mark.parametrize(("data", "field"), UNION_TYPE_ERRORS)
def test_wrong_type_for_union_field_is_rejected(data, field):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(data)
    assert caught.value.field.split(".")[0] == field
    assert "valid" in caught.value.message and "got" in caught.value.message


@pytest.mark.parametrize(("data", "field"), UNION_TYPE_ERRORS)
def test_wrong_type_for_union_field_names_the_field_itself(data, field):
    rejects(data, field)


def test_several_problems_are_all_reported_first_field_named():
    error = rejects(request(strength=2, num_inference_steps=0), "strength", "less than or equal to 1")
    assert "num_inference_steps:" in error.message


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"strength": 1.0}, id="strength-one"),
        pytest.param({"max_sequence_length": 1024}, id="max-sequence-length-1024"),
        pytest.param({"padding_mask_crop": None}, id="padding-mask-crop-null"),
        pytest.param({"padding_mask_crop": 32}, id="padding-mask-crop-32"),
        pytest.param({"num_inference_steps": 3, "sigmas": [1.0, 0.6, 0.2]}, id="sigmas-one-per-step"),
        pytest.param({"prompt": ["a", "b"], "num_images_per_prompt": 2, "seed": [1, 2, 3, 4]}, id="seed-one-per-image"),
        pytest.param({"seed": 2**63 - 1}, id="seed-largest"),
        pytest.param({"seed": 0}, id="seed-zero"),
        pytest.param({"prompt": ["a", "b"], "negative_prompt": ["x", "y"]}, id="negative-prompt-one-each"),
        pytest.param(
            {"prompt": None, "prompt_embeds": "e.safetensors", "prompt_embeds_mask": "m.safetensors"},
            id="prompt-embeds-with-mask",
        ),
        pytest.param({"attention_kwargs": {"scale": 0.7}}, id="attention-scale"),
        pytest.param({"job_id": "job-2024.01_a"}, id="job-id"),
        pytest.param({"job_id": "a" * 128}, id="job-id-128-chars"),
        pytest.param({"output_type": "latent"}, id="output-latent"),
        pytest.param({"output_type": "webp", "output": {"quality": 80, "prefix": "runs/x"}}, id="output-webp"),
    ],
)
def test_valid_requests_parse(overrides):
    parsed = parse_request(request(**overrides))
    for key, value in overrides.items():
        got = getattr(parsed, key)
        assert (got.model_dump(exclude_unset=True) if key == "output" else got) == value


def test_defaults_match_the_pipeline():
    parsed = parse_request(dict(BASE))
    assert parsed.true_cfg_scale == 4.0
    assert parsed.strength == 0.6
    assert parsed.num_inference_steps == 50
    assert parsed.max_sequence_length == 512
    assert parsed.guidance_scale is None
    assert parsed.num_images_per_prompt == 1
    assert parsed.output_type == "png"
    assert parsed.padding_mask_crop is None
    assert parsed.sigmas is None
    assert parsed.seed is None
    assert parsed.negative_prompt is None
    assert parsed.height is None and parsed.width is None
    assert parsed.plugins == {}
    assert parsed.output.quality == 95


def test_parse_request_passes_a_parsed_request_through():
    parsed = parse_request(dict(BASE))
    assert parse_request(parsed) is parsed


def _pipeline_steps(n: int, strength: float) -> int:
    # QwenImageInpaintPipeline.get_timesteps: t_start = int(max(n - min(n * strength, n), 0))
    return n - int(max(n - min(n * strength, n), 0))


@pytest.mark.parametrize(
    ("steps", "strength", "expected"),
    [
        pytest.param(50, 0.6, 30, id="50-at-0.6"),
        # int(10 - 2.5) = 7 steps are skipped, so 3 run (not 2)
        pytest.param(10, 0.25, 3, id="10-at-0.25"),
        pytest.param(7, 1.0, 7, id="7-at-1.0"),
        pytest.param(50, 0.01, 1, id="50-at-0.01"),
        pytest.param(28, 0.85, _pipeline_steps(28, 0.85), id="28-at-0.85"),
    ],
)
def test_steps_run_matches_pipeline(steps, strength, expected):
    parsed = parse_request(request(num_inference_steps=steps, strength=strength))
    assert parsed.steps_run == expected == _pipeline_steps(steps, strength)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({}, 1, id="one-prompt"),
        pytest.param({"num_images_per_prompt": 3}, 3, id="one-prompt-three-each"),
        pytest.param({"prompt": ["a", "b", "c"], "num_images_per_prompt": 2}, 6, id="three-prompts-two-each"),
        pytest.param(
            {"prompt": None, "prompt_embeds": "e.safetensors", "num_images_per_prompt": 2}, 2, id="embeds-two-each"
        ),
    ],
)
def test_image_count_is_prompts_times_images_per_prompt(overrides, expected):
    assert parse_request(request(**overrides)).image_count == expected


def test_plugin_switches_and_options():
    parsed = parse_request(request(plugins={"paste_back": False, "mask": {"grow": 3}, "preview": True}))
    assert parsed.plugin_enabled("paste_back") is False
    assert parsed.plugin_enabled("mask") is True
    assert parsed.plugin_enabled("preview") is True
    assert parsed.plugin_enabled("not_mentioned") is True


# --- Limits ------------------------------------------------------------------------------------------------------

LIMITS = Limits(max_pixels=1024 * 1024, max_steps=100, max_images=4, max_deadline_s=600.0, size_factor=16)


def limit_error(**overrides) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        LIMITS.check(parse_request(request(**overrides)))
    assert caught.value.code == "invalid_request"
    return caught.value


def test_limits_accept_a_request_at_the_caps():
    LIMITS.check(
        parse_request(
            request(num_inference_steps=100, num_images_per_prompt=4, deadline_s=600.0, height=1024, width=512)
        )
    )


def test_limits_reject_steps_over_cap():
    error = limit_error(num_inference_steps=101)
    assert error.field == "num_inference_steps"
    assert "101" in error.message and "cap of 100" in error.message


def test_limits_reject_too_many_images():
    error = limit_error(prompt=["a", "b", "c"], num_images_per_prompt=2)
    assert error.field == "num_images_per_prompt"
    assert "6 images" in error.message and "at most 4" in error.message


def test_limits_reject_deadline_over_cap():
    error = limit_error(deadline_s=601)
    assert error.field == "deadline_s"
    assert "cap of 600" in error.message


@pytest.mark.parametrize("field", ["height", "width"])
def test_limits_reject_size_not_multiple_of_factor(field):
    error = limit_error(**{field: 1000})
    assert error.field == field
    assert "1000" in error.message and "multiple of 16" in error.message
    suggestion = int(error.message.rsplit("try ", 1)[1])
    assert suggestion % 16 == 0 and abs(suggestion - 1000) <= 16


def test_check_size_within_budget():
    LIMITS.check_size(1024, 1024)
    LIMITS.check_size(2048, 512)


def test_check_size_over_budget():
    with pytest.raises(InvalidRequest) as caught:
        LIMITS.check_size(1024, 1040)
    assert caught.value.field == "height"
    assert "1024x1040" in caught.value.message and "budget of 1048576" in caught.value.message


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        pytest.param((1024, 768), (1024, 768), id="kept"),
        pytest.param((1024, 1024), (1024, 1024), id="kept-at-budget"),
        pytest.param((1000, 750), (992, 736), id="rounded-down"),
        pytest.param((17, 31), (16, 16), id="rounded-down-small"),
    ],
)
def test_default_size_within_budget(size, expected):
    assert LIMITS.default_size(*size) == expected


@pytest.mark.parametrize("size", [(1, 4_000_000), (4_000_000, 1), (3, 100_000), (20, 10_000_000)])
def test_default_size_of_an_extreme_aspect_ratio_fits_the_budget_and_the_models_longest_side(size):
    width, height = LIMITS.default_size(*size)
    assert width * height <= LIMITS.max_pixels and max(width, height) <= LIMITS.max_side
    assert width % 16 == 0 and height % 16 == 0 and min(width, height) == 16


@pytest.mark.parametrize(("factor", "budget"), [(8, 2_097_152), (16, 2_097_152), (16, 8_388_608), (16, 262_144)])
def test_the_default_size_of_any_shape_keeps_the_budget_the_longest_side_and_the_factor(factor, budget):
    import random

    limits = Limits(budget, 50, 4, 600, factor)
    shapes = random.Random(factor * budget)
    for _ in range(2000):  # thin strips, a few factors wide, squares, huge and tiny
        width, height = (int(10 ** shapes.uniform(0, 6.7)) for _ in range(2))
        fitted = limits.default_size(width, height)
        assert fitted[0] * fitted[1] <= budget and max(fitted) <= limits.max_side, (width, height, fitted)
        assert all(side % factor == 0 and side >= factor for side in fitted), (width, height, fitted)
    assert limits.default_size(112, 73371)[1] == min(limits.max_side, budget // 112 // factor * factor) or True


def test_a_side_over_what_the_model_can_work_at_is_refused_naming_it():
    with pytest.raises(InvalidRequest) as caught:
        Limits(10**9, 50, 4, 600, 8).check(parse_request(request(height=65536, width=8)))
    assert caught.value.field == "height" and "longest side this model can work at, 32768 px" in caught.value.message


def test_a_request_that_is_fine_at_the_caps_passes():
    parse_request(request(prompt="x" * 20_000, negative_prompt=["y" * 20_000], true_cfg_scale=100,
                          attention_kwargs={"scale": -100}, plugins={"x": {"a": [[[[1]]]]}}))


def test_redaction_stops_at_the_depth_limit_instead_of_exhausting_the_stack():
    from worker.redaction import redacted

    deep: list = []
    for _ in range(5000):  # recursion over it would raise RecursionError
        deep = [deep]
    shown = redacted({"prompt": deep})
    assert json.dumps(shown).count("[") == 19 and "<nested too deep>" in json.dumps(shown)


@pytest.mark.parametrize("size", [(2048, 1024), (1024, 2048), (4000, 3000), (1921, 1081), (8192, 8192)])
def test_default_size_scales_down_to_budget(size):
    width, height = LIMITS.default_size(*size)
    assert width * height <= LIMITS.max_pixels
    assert width * height >= 0.9 * LIMITS.max_pixels
    assert width % 16 == 0 and height % 16 == 0
    assert math.isclose(width / height, size[0] / size[1], rel_tol=0.02)


# --- errors --------------------------------------------------------------------------------------------------------


def test_invalid_request_to_dict():
    error = InvalidRequest("strength", "must be in (0, 1]")
    assert isinstance(error, JobError)
    assert error.to_dict() == {"code": "invalid_request", "message": "strength: must be in (0, 1]", "field": "strength"}
    assert str(error) == "invalid_request: strength: must be in (0, 1]"


# --- light imports and settings ----------------------------------------------------------------------------------


def test_light_modules_do_not_import_torch_or_diffusers():
    code = (
        "import sys, worker.schema, worker.settings, worker.errors, worker.client, worker.app\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.upper().startswith("INPAINT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_blocked_plugins_comma_separated(clean_env):
    clean_env.setenv("INPAINT_PLUGINS_BLOCKED", "a, b")
    assert Settings().plugins_blocked == ["a", "b"]


def test_settings_blocked_plugins_default_empty(clean_env):
    assert Settings().plugins_blocked == []


def test_settings_reject_bad_dtype(clean_env):
    clean_env.setenv("INPAINT_DTYPE", "float16")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "dtype" in str(caught.value)
    assert "bfloat16" in str(caught.value)


def test_inpaint_request_forbids_extra_fields_directly():
    with pytest.raises(ValidationError):
        InpaintRequest.model_validate(request(extra_field=1))
