"""The job engine against the tiny model: every pipeline parameter reaches the pipeline and does what it says."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.support import box_mask, data_url, photo
from worker import job
from worker.errors import DeadlineExceeded, InvalidRequest, JobError, PluginError
from worker.hooks import hookimpl
from worker.inputs import LocalFetcher
from worker.outputs import DirectorySink

NO_PASTE = {"paste_back": False}


def direct(pipe, seed: int, **kwargs) -> list[np.ndarray]:
    kwargs.setdefault("image", photo())
    kwargs.setdefault("mask_image", box_mask())
    kwargs.setdefault("num_inference_steps", 4)
    images = pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images
    return [np.asarray(image).astype(int) for image in images]


def test_job_is_pixel_identical_to_a_direct_pipeline_call(runner, direct_pipe):
    result = runner.run(plugins=NO_PASTE, seed=5, negative_prompt="blurry")
    expected = direct(direct_pipe, 5, prompt="a red apple on a table", negative_prompt="blurry", height=64, width=64)
    assert np.array_equal(runner.pixels(result), expected[0])


def test_strength_trims_the_steps_and_progress_counts_the_steps_that_run(runner):
    seen = []
    result = runner.run(num_inference_steps=10, strength=0.5, reporter=seen.append)
    steps = [p.step for p in seen if p.stage == "denoising" and p.step]
    assert result.parameters.steps_run == 5
    assert steps == [1, 2, 3, 4, 5]
    assert {p.total_steps for p in seen if p.total_steps} == {5}
    assert seen[-1].percent == 100.0
    stages = list(dict.fromkeys(p.stage for p in seen))
    assert stages == ["fetching", "preprocessing", "encoding", "denoising", "decoding", "postprocessing", "uploading"]
    assert set(result.timings) >= {"fetching", "encoding", "denoising", "decoding", "uploading", "total"}


def test_progress_counts_every_image_from_the_first_report_after_the_inputs_are_checked(runner):
    seen = []
    runner.run(num_inference_steps=4, strength=1.0, num_images_per_prompt=3, reporter=seen.append)
    later = seen[[p.stage for p in seen].index("encoding"):]
    assert {(p.total_steps, p.images) for p in later} == {(12, 3)}  # not 0 steps of 1 image until the first step
    assert [p.step for p in later if p.stage == "denoising"][-1] == 12 and later[-1].percent == 100.0


def test_padding_mask_crop_returns_the_original_size_with_the_outside_untouched(runner):
    source = photo(96, 64)
    mask = box_mask(96, 64, (56, 16, 80, 40))
    result = runner.run(plugins=NO_PASTE, image=data_url(source), mask_image=data_url(mask), padding_mask_crop=4,
                        height=64, width=64)
    out = runner.pixels(result)
    assert out.shape == (64, 96, 3)
    parameters = result.parameters
    assert (parameters.width, parameters.height) == (result.images[0].width, result.images[0].height) == (96, 64)
    assert (parameters.processing_width, parameters.processing_height) == (64, 64)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], np.asarray(source).astype(int)[outside])
    assert not np.array_equal(out[~outside], np.asarray(source).astype(int)[~outside])


@pytest.mark.parametrize(("fields", "on"), [
    ({}, False),
    ({"negative_prompt": "blurry"}, True),
    ({"negative_prompt": "blurry", "true_cfg_scale": 1.0}, False),
])
def test_true_cfg_runs_only_with_a_negative_prompt_and_the_result_says_so(runner, fields, on):
    result = runner.run(**fields)
    assert result.parameters.true_cfg is on


def test_true_cfg_changes_the_image(runner):
    off = runner.pixels(runner.run(plugins=NO_PASTE, negative_prompt="blurry", true_cfg_scale=1.0))
    on = runner.pixels(runner.run(plugins=NO_PASTE, negative_prompt="blurry", true_cfg_scale=4.0))
    assert not np.array_equal(off, on)


def test_list_prompts_and_images_per_prompt_give_one_image_each_with_its_seed(runner):
    result = runner.run(prompt=["a cat", "a dog"], num_images_per_prompt=2, seed=100)
    assert [(i.prompt_index, i.seed) for i in result.images] == [(0, 100), (0, 101), (1, 102), (1, 103)]
    assert result.parameters.seeds == [100, 101, 102, 103]
    assert len({runner.pixels(result, i).tobytes() for i in range(4)}) == 4


def test_three_prompts_with_two_images_each_make_six_images_within_the_cap_of_eight(runner, settings):
    assert settings.max_images == 8
    result = runner.run(prompt=["a cat", "a dog", "a fox"], num_images_per_prompt=2)
    assert [image.prompt_index for image in result.images] == [0, 0, 1, 1, 2, 2]


def test_seeds_counted_up_from_the_largest_wrap_to_seeds_a_request_may_give(runner):
    result = runner.run(num_images_per_prompt=2, seed=2**63 - 1)
    assert result.parameters.seeds == [2**63 - 1, 0]
    assert runner.run(num_images_per_prompt=2, seed=result.parameters.seeds).images  # a valid request again


def test_a_batched_job_gives_each_prompt_and_seed_the_image_it_gets_alone(runner, direct_pipe):
    prompts = ["a cat", "a small brown dog sitting on green grass in the warm afternoon sunshine"]
    batch = runner.run(plugins=NO_PASTE, prompt=prompts, num_images_per_prompt=2, seed=[11, 12, 13, 14],
                       negative_prompt="blurry")
    for image in batch.images:
        alone = runner.run(plugins=NO_PASTE, prompt=prompts[image.prompt_index], seed=image.seed,
                           negative_prompt="blurry")
        assert np.array_equal(runner.pixels(batch, image.index), runner.pixels(alone))
    # upstream's own batch path does not give that (the bug this job works around)
    upstream = direct_pipe(prompt=prompts, negative_prompt=["blurry"] * 2, image=photo(), mask_image=box_mask(),
                           num_inference_steps=4, num_images_per_prompt=2, height=64, width=64,
                           generator=[torch.Generator().manual_seed(s) for s in (11, 12, 13, 14)]).images
    assert not all(np.array_equal(np.asarray(u).astype(int), runner.pixels(batch, i)) for i, u in enumerate(upstream))


def test_seeds_reproduce_and_differ(runner):
    first, again, other = (runner.pixels(runner.run(seed=s)) for s in (3, 3, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_no_seed_picks_one_and_records_it(runner):
    result = runner.run(seed=None)
    replay = runner.run(seed=result.images[0].seed)
    assert np.array_equal(runner.pixels(result), runner.pixels(replay))


def test_sigmas_set_the_schedule(runner):
    default = runner.run(plugins=NO_PASTE, num_inference_steps=4, strength=1.0)
    custom = runner.run(plugins=NO_PASTE, num_inference_steps=4, strength=1.0, sigmas=[1.0, 0.5, 0.2, 0.05])
    assert custom.parameters.steps_run == 4
    assert not np.array_equal(runner.pixels(default), runner.pixels(custom))


def test_latents_from_safetensors_are_the_starting_noise(runner, tmp_path):
    seq, channels = (64 // 8) * (64 // 8), 4 * 4
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"noise{seed}.safetensors"
        save_file({"latents": torch.randn(1, seq, channels, generator=torch.Generator().manual_seed(seed))}, path)
        paths.append(str(path))
    a, a_again, b = (runner.pixels(runner.run(plugins=NO_PASTE, latents=p)) for p in (paths[0], paths[0], paths[1]))
    seeded = runner.pixels(runner.run(plugins=NO_PASTE))
    assert np.array_equal(a, a_again)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, seeded)


def test_latents_of_the_wrong_shape_are_refused(runner, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"latents": torch.zeros(1, 10, 16)}, path)
    with pytest.raises(InvalidRequest) as caught:
        runner.run(latents=str(path))
    assert caught.value.field == "latents" and "expected packed latents" in caught.value.message


def test_prompt_embeds_from_safetensors_match_the_prompt(runner, model, tmp_path):
    embeds, mask = model.pipe.encode_prompt("a cat", device="cpu")
    path = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": embeds.contiguous()}, path)
    mask_path = tmp_path / "mask.safetensors"
    save_file({"prompt_embeds_mask": torch.ones(embeds.shape[:2], dtype=torch.long)}, mask_path)
    by_prompt = runner.run(plugins=NO_PASTE, prompt="a cat")
    by_embeds = runner.run(plugins=NO_PASTE, prompt=None, prompt_embeds=str(path), prompt_embeds_mask=str(mask_path))
    assert np.array_equal(runner.pixels(by_prompt), runner.pixels(by_embeds))


def test_prompt_embeds_of_the_wrong_width_are_refused(runner, tmp_path):
    path = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 5, 7)}, path)
    with pytest.raises(InvalidRequest) as caught:
        runner.run(prompt=None, prompt_embeds=str(path))
    assert caught.value.field == "prompt_embeds"


def test_output_type_latent_writes_packed_latents(runner):
    from safetensors.torch import load_file

    result = runner.run(output_type="latent")
    image = result.images[0]
    assert image.location.endswith(".safetensors") and image.content_type == "application/octet-stream"
    assert load_file(image.location)["latents"].shape == (1, 64, 16)


@pytest.mark.parametrize(("output_type", "content_type"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_output_formats(runner, output_type, content_type):
    image = runner.run(output_type=output_type).images[0]
    assert image.content_type == content_type
    assert Image.open(image.location).format == output_type.upper()


def test_with_padding_mask_crop_the_format_limit_applies_to_the_output_size(runner, settings, tmp_path):
    """The model works on the crop, but the output has the input's size: a format that cannot hold it is refused."""
    seen = []
    request = runner.request(image=data_url(photo(16400, 64)), mask_image=data_url(box_mask(16400, 64)),
                             padding_mask_crop=8, output_type="webp")
    with pytest.raises(InvalidRequest) as caught:
        job.run(request, model=runner.model, plugins=runner.plugins, fetcher=LocalFetcher(10**7),
                sink=DirectorySink(tmp_path), settings=settings, reporter=seen.append)
    assert caught.value.field == "padding_mask_crop"
    assert caught.value.message == ("padding_mask_crop: with padding_mask_crop the output keeps the input's size: "
                                    "16400 px is over what webp can hold (16383 px a side); choose output_type png")
    assert not {"encoding", "denoising"} & {p.stage for p in seen}  # refused before any model work


def test_with_padding_mask_crop_the_pixel_budget_bounds_the_processing_size_and_the_result_says_both(runner, settings,
                                                                                                       tmp_path):
    """A crop is how a large image is worked on within the budget: the output keeps the input's size."""
    request = runner.request(image=data_url(photo(128, 64)), mask_image=data_url(box_mask(128, 64)),
                             padding_mask_crop=8)
    result = job.run(request, model=runner.model, plugins=runner.plugins, fetcher=LocalFetcher(10**7),
                     sink=DirectorySink(tmp_path), settings=settings.model_copy(update={"max_pixels": 64 * 64}))
    image, parameters = result.images[0], result.parameters
    assert (image.width, image.height) == (parameters.width, parameters.height) == (128, 64)
    assert parameters.processing_width * parameters.processing_height <= 64 * 64


def test_max_sequence_length_refuses_a_longer_prompt(runner):
    long_prompt = " ".join(["apple"] * 40)
    with pytest.raises(InvalidRequest) as caught:
        runner.run(prompt=long_prompt, max_sequence_length=20)
    assert caught.value.field == "prompt" and "max_sequence_length" in caught.value.message
    assert runner.run(prompt=long_prompt, max_sequence_length=60).images


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_a_prompt_too_long_is_told_in_its_own_tokens_and_the_room_the_template_leaves(runner, name):
    """The pipeline's chat template adds 5 closing tokens to every prompt's sequence, which max_sequence_length cuts."""
    fields = {"prompt": "a cat", "negative_prompt": "blurry", name: "a red apple"}  # "a red apple" is 3 tokens
    with pytest.raises(InvalidRequest) as caught:
        runner.run(**fields, max_sequence_length=7)
    assert caught.value.message == (
        f"{name}: is 3 tokens; with max_sequence_length 7 a prompt may have at most 2 (the pipeline's chat template "
        "adds 5 closing tokens to every prompt's sequence); raise max_sequence_length to 8 or shorten it")
    assert runner.run(**fields, max_sequence_length=8).images  # what the message says is enough


def test_a_long_negative_prompt_is_refused_only_when_true_cfg_would_encode_it(runner):
    long_negative = " ".join(["blurry"] * 40)
    with pytest.raises(InvalidRequest) as caught:
        runner.run(negative_prompt=long_negative, true_cfg_scale=4.0, max_sequence_length=20)
    assert caught.value.field == "negative_prompt"
    result = runner.run(negative_prompt=long_negative, true_cfg_scale=1.0, max_sequence_length=20)
    assert result.images and result.parameters.true_cfg is False


def test_qwen_image_ignores_guidance_scale_and_the_result_says_so(runner, model):
    assert not model.guidance_distilled
    plain = runner.run(plugins=NO_PASTE)
    guided = runner.run(plugins=NO_PASTE, guidance_scale=7.5)
    assert np.array_equal(runner.pixels(plain), runner.pixels(guided))
    assert guided.parameters.guidance_scale is None and plain.parameters.guidance_scale is None


def test_a_guidance_distilled_model_gets_guidance_scale_1_unless_asked(runner, model):
    """Upstream fails on a guidance-distilled model without guidance_scale; the worker gives it the spec's 1.0.

    Checked without a job: diffusers 0.42.1's Qwen-Image transformer cannot run with guidance embeddings at all
    (it passes `guidance` to an embedding that takes none)."""
    from types import SimpleNamespace

    from diffusers import QwenImageTransformer2DModel

    from worker.model import LoadedModel
    from worker.schema import parse_request
    from worker.tiny import TINY_TRANSFORMER

    transformer = QwenImageTransformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": True})
    distilled = LoadedModel(SimpleNamespace(transformer=transformer), "tiny-distilled", model.device, model.dtype,
                            True, 0.0)
    assert distilled.guidance_distilled
    left_out, asked = parse_request(runner.request()), parse_request(runner.request(guidance_scale=3.5))
    assert (job.guidance_scale(left_out, distilled), job.guidance_scale(asked, distilled)) == (1.0, 3.5)
    assert job.guidance_scale(asked, model) is None  # Qwen-Image ignores it: the pipeline gets none


def test_attention_kwargs_reach_the_transformer(runner, model):
    seen = []
    handle = model.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_kwargs")), with_kwargs=True)
    try:
        runner.run(attention_kwargs={"scale": 0.5})
    finally:
        handle.remove()
    assert seen and all(kwargs == {"scale": 0.5} for kwargs in seen)


def test_paste_back_keeps_every_pixel_outside_the_mask_exactly(runner):
    source, mask = photo(), box_mask()
    pasted = runner.pixels(runner.run(image=data_url(source), mask_image=data_url(mask)))
    raw = runner.pixels(runner.run(plugins=NO_PASTE, image=data_url(source), mask_image=data_url(mask)))
    outside = np.asarray(mask) == 0
    original = np.asarray(source).astype(int)
    assert np.array_equal(pasted[outside], original[outside])
    assert not np.array_equal(raw[outside], original[outside])  # the VAE round trip drifts without it
    assert not np.array_equal(pasted[~outside], original[~outside])


def test_the_output_keeps_the_input_size_not_1024(runner):
    result = runner.run(image=data_url(photo(120, 72)), mask_image=data_url(box_mask(120, 72)))
    assert (result.images[0].width, result.images[0].height) == (120, 72)
    odd = runner.run(image=data_url(photo(101, 70)), mask_image=data_url(box_mask(101, 70)))
    assert (odd.parameters.width, odd.parameters.height) == (96, 64)


def test_the_pixel_budget_scales_the_default_size_and_refuses_a_bigger_one(runner, settings, model, plugins, tmp_path):
    from worker import job
    from worker.inputs import LocalFetcher
    from worker.outputs import DirectorySink

    small = settings.model_copy(update={"max_pixels": 64 * 64})
    kwargs = dict(model=model, plugins=plugins, fetcher=LocalFetcher(10**7), sink=DirectorySink(tmp_path),
                  settings=small)
    request = runner.request(image=data_url(photo(128, 128)), mask_image=data_url(box_mask(128, 128)))
    assert job.run(request, **kwargs).parameters.width == 64
    with pytest.raises(InvalidRequest) as caught:
        job.run({**request, "height": 128, "width": 128}, **kwargs)
    assert "budget" in caught.value.message


def test_an_extreme_aspect_ratio_with_no_size_given_runs_within_the_pixel_budget(runner, settings, model, plugins,
                                                                                   tmp_path):
    small = settings.model_copy(update={"max_pixels": 64 * 1024})
    strip = runner.request(image=data_url(Image.new("RGB", (1, 400_000), (90, 20, 20))),
                           mask_image=data_url(Image.new("L", (1, 400_000), 255)), num_inference_steps=2)
    result = job.run(strip, model=model, plugins=plugins, fetcher=LocalFetcher(10**7), sink=DirectorySink(tmp_path),
                     settings=small)  # the default size was 8 x 400000, and the error named height, never given
    assert (result.parameters.width, result.parameters.height) == (8, 8192)  # one factor wide, the budget's height


def half_transparent(image: Image.Image) -> Image.Image:
    """The left half fully transparent (its colours stay in the file), the right half opaque."""
    rgba = image.convert("RGBA")
    alpha = np.full((image.height, image.width), 255, np.uint8)
    alpha[:, : image.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def on_white_left(image: Image.Image) -> Image.Image:
    out = np.asarray(image.convert("RGB")).copy()
    out[:, : image.width // 2] = 255
    return Image.fromarray(out)


@pytest.mark.parametrize(("mode", "given", "expected"), [
    ("RGBA", lambda image: image.convert("RGBA"), lambda image: image),
    ("RGBA-half-transparent", half_transparent, on_white_left),  # transparent pixels over white
    ("L", lambda image: image.convert("L"), lambda image: image.convert("L").convert("RGB")),
    ("P", lambda image: image.convert("P"), lambda image: image.convert("P").convert("RGB")),
    ("I;16", lambda image: Image.fromarray(np.asarray(image.convert("L")).astype("uint16") * 257),  # scaled, not
     lambda image: image.convert("L").convert("RGB")),                                              # clipped
    ("CMYK", lambda image: image.convert("CMYK"), None),  # a JPEG: lossy, so only that it runs
])
def test_other_image_modes_are_converted(runner, mode, given, expected):
    image = photo()
    converted = given(image)
    result = runner.run(image=data_url(converted) if mode != "CMYK" else cmyk_url(converted))
    if expected is not None:  # outside the mask paste_back keeps the input as the pipeline received it
        keep = np.asarray(box_mask()) == 0
        assert np.array_equal(runner.pixels(result)[keep], np.asarray(expected(image)).astype(int)[keep])


def cmyk_url(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"mask_image": data_url(Image.new("L", (64, 64), 0))}, "mask_image", "empty"),
    ({"height": 60, "width": 64}, "height", "multiple of 8"),
    ({"num_inference_steps": 500}, "num_inference_steps", "cap"),
    ({"prompt": ["a"] * 3, "num_images_per_prompt": 3}, "num_images_per_prompt", "at most"),
    ({"plugins": {"mask": {"grow": -1}}}, "plugins.mask.grow", "grow"),
    ({"plugins": {"nope": True}}, "plugins.nope", "no plugin"),
    ({"image": "s3://bucket/key.png"}, "image", "local runner"),
    ({"image": "/no/such/file.png"}, "image", "no file"),
])
def test_bad_input_fails_clearly_and_the_next_job_runs(runner, fields, field, words):
    with pytest.raises(JobError) as caught:
        runner.run(**fields)
    assert caught.value.field == field
    assert words in caught.value.message
    assert runner.run().images


def test_a_job_past_its_deadline_stops_at_the_next_step(runner):
    seen = []
    with pytest.raises(DeadlineExceeded) as caught:
        runner.run(deadline_s=0.000001, reporter=seen.append)
    assert caught.value.code == "deadline_exceeded"
    assert not any(p.stage == "uploading" for p in seen)
    assert not [p.step for p in seen if p.stage == "denoising" and p.step]  # it stopped at step 1, before it counted


def test_previews_every_n_steps_are_written_and_reported(runner):
    seen = []
    result = runner.run(preview_every=2, num_inference_steps=10, strength=0.7, reporter=seen.append)
    references = list(dict.fromkeys(p.preview for p in seen if p.preview))
    assert [ref.rsplit("/", 1)[1] for ref in references] == ["0-0002.jpg", "0-0004.jpg", "0-0006.jpg", "0-0007.jpg"]
    for ref in references:
        with Image.open(ref) as preview:
            assert preview.format == "JPEG" and preview.width == 256
    assert result.images
    without = []
    runner.run(reporter=without.append)
    assert not any(p.preview for p in without)  # off unless asked for


def test_the_preview_follows_the_latents(model):
    from worker.builtin.preview import render_preview

    packed = torch.zeros(1, 64, 16)
    flat = np.asarray(render_preview(model.pipe, packed, 64, 64)).astype(int)
    assert flat.reshape(-1, 3).std(axis=0).max() < 1  # one latent everywhere: one colour everywhere
    packed[:, :32] = 3.0  # the top half of the grid moves
    split = np.asarray(render_preview(model.pipe, packed, 64, 64)).astype(int)
    assert np.abs(split[:100] - flat[:100]).max() > 5
    assert np.abs(split[-100:] - flat[-100:]).max() <= 1


def test_a_repeated_prompt_reuses_its_embeddings_and_gives_the_same_image(runner, model):
    calls = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    prompt = f"a teapot number {time.monotonic_ns()}"
    try:
        first = runner.pixels(runner.run(prompt=prompt))
        second = runner.pixels(runner.run(prompt=prompt))
        assert len(calls) == 1  # encoded once, reused the second time
        model.pipe.prompt_cache_size, size = 0, model.pipe.prompt_cache_size
        try:
            uncached = runner.pixels(runner.run(prompt=prompt))
        finally:
            model.pipe.prompt_cache_size = size
    finally:
        handle.remove()
    assert len(calls) == 2
    assert np.array_equal(first, second) and np.array_equal(first, uncached)


def test_warm_up_runs_a_small_job_in_a_thread_that_ends_with_it(model):
    """A thread left holding torch's CPU thread team would slow every later job (docs/BENCHMARKS.md)."""
    from worker.model import warm_up

    ran_in = []
    handle = model.pipe.transformer.register_forward_pre_hook(lambda *_: ran_in.append(threading.current_thread()))
    try:
        assert warm_up(model, 60, steps=1) > 0  # rounded to the size factor, runs end to end
    finally:
        handle.remove()
    assert ran_in and all(thread is not threading.current_thread() and not thread.is_alive() for thread in ran_in)


def test_auto_crop_inpaints_a_small_mask_in_its_region_and_returns_the_full_image(runner):
    source, mask = photo(256, 256), box_mask(256, 256, (200, 40, 224, 64))
    cropped = runner.run(plugins={"auto_crop": {"enabled": True}, "paste_back": False}, image=data_url(source),
                         mask_image=data_url(mask))
    assert (cropped.images[0].width, cropped.images[0].height) == (256, 256)
    assert cropped.parameters.padding_mask_crop == 32 and cropped.parameters.processing_width == 88
    assert (cropped.parameters.width, cropped.parameters.height) == (256, 256)
    out, original = runner.pixels(cropped), np.asarray(source).astype(int)
    assert np.array_equal(out[:, :100], original[:, :100]) and np.array_equal(out[140:], original[140:])
    assert not np.array_equal(out[40:64, 200:224], original[40:64, 200:224])
    whole = runner.run(image=data_url(source), mask_image=data_url(mask))
    assert whole.parameters.padding_mask_crop is None and whole.parameters.width == 256  # off unless asked
    sized = runner.run(plugins={"auto_crop": {"enabled": True}}, image=data_url(source), mask_image=data_url(mask),
                       width=128)
    assert sized.parameters.padding_mask_crop is None  # a job that chose its output size is not cropped
    assert (sized.images[0].width, sized.images[0].height) == (128, 128)


def test_a_failed_jobs_tensors_are_freed_when_it_ends_not_at_the_next_garbage_collection(runner, settings, tmp_path):
    """A failed call's frames (and the tensors in them) must not wait in reference cycles for a full collection:
    on a GPU the next job would run out of memory."""
    freed = []

    class Failing:
        @hookimpl
        def inpaint_step_end(self, latents):
            scratch = latents * 2  # held only by this frame
            freed.append(weakref.ref(scratch))
            raise ValueError("boom")

    manager = type(runner.plugins)(load_entry_points=False)
    manager.register(Failing(), "failing")
    gc.disable()  # only reference counting frees memory in this test
    try:
        with pytest.raises(PluginError):
            job.run(runner.request(), model=runner.model, plugins=manager, fetcher=LocalFetcher(10**7),
                    sink=DirectorySink(tmp_path), settings=settings)
        assert freed and freed[0]() is None
    finally:
        gc.enable()


def test_a_job_without_a_negative_prompt_logs_no_warning_that_true_cfg_is_off(runner):
    import logging

    from diffusers.pipelines.qwenimage import pipeline_qwenimage_inpaint

    heard: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = heard.append
    pipeline_qwenimage_inpaint.logger.addHandler(listener)
    try:  # the result says whether true CFG ran (parameters.true_cfg): upstream's warning on every such job is noise
        result = runner.run(true_cfg_scale=4.0, num_inference_steps=2)
        low = runner.run(true_cfg_scale=1.0, negative_prompt="blurry", num_inference_steps=2)
    finally:
        pipeline_qwenimage_inpaint.logger.removeHandler(listener)
    assert result.parameters.true_cfg is False and result.parameters.true_cfg_scale == 4.0
    assert low.parameters.true_cfg is False
    assert np.array_equal(runner.pixels(low), runner.pixels(runner.run(true_cfg_scale=1.0, num_inference_steps=2)))
    assert not [record for record in heard if "guidance" in record.getMessage()], [r.getMessage() for r in heard]
