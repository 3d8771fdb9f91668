"""The speed settings change how fast a job runs, never which image it makes.

Each option is compared with the plain path on the same call. The comparison is on the final
latents (`output_type="latent"`), where the tiny model's differences show: its decoded pixels
hardly move even when attention is wrong. Speed is measured in `bench/`, not here.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from tests.support import box_mask, data_url, photo

LONG_NEGATIVE = "blurry, low quality, distorted, extra fingers"
NOISE = 1e-4  # float32 on the CPU: the same computation in another order differs by ~1e-6


def latents(model, prompt="a red apple on a table", size=(64, 64), callback=None, **call) -> torch.Tensor:
    from worker.model import generator

    width, height = size
    if callback is not None:
        call.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    return model.pipe(prompt=prompt, image=photo(width, height), mask_image=box_mask(width, height, (16, 16, 48, 48)),
                      height=height, width=width, num_inference_steps=4, strength=1.0, generator=generator(3),
                      output_type="latent", **call).images


@contextmanager
def batches_of(model, block: int = 0):
    """The batch of each computation of a transformer block's attention (a skipped block computes none)."""
    batches: list[int] = []
    handle = model.pipe.transformer.transformer_blocks[block].attn.register_forward_hook(
        lambda _module, _args, output: batches.append(output[0].shape[0]))
    try:
        yield batches
    finally:
        handle.remove()


@pytest.fixture
def blocks_run(model):
    with batches_of(model) as batches:
        yield batches


@pytest.fixture
def cfg_batching(model):
    def switch(on: bool) -> None:
        model.pipe.batch_cfg = on

    before = model.pipe.batch_cfg
    yield switch
    model.pipe.batch_cfg = before


@pytest.mark.parametrize("negative_prompt", [LONG_NEGATIVE, "a red apple on a table"],
                         ids=["longer-negative", "same-length"])
def test_batched_cfg_runs_one_forward_a_step_and_gives_the_same_result(model, blocks_run, cfg_batching,
                                                                        negative_prompt):
    cfg_batching(False)
    apart = latents(model, negative_prompt=negative_prompt, true_cfg_scale=4.0)
    assert blocks_run == [1] * 8  # 4 steps: cond and uncond one after the other
    blocks_run.clear()
    cfg_batching(True)
    together = latents(model, negative_prompt=negative_prompt, true_cfg_scale=4.0)
    assert blocks_run == [2] * 4  # one batch of two a step
    assert (together - apart).abs().max() < NOISE


def test_jobs_run_with_batched_cfg_by_default(runner, blocks_run, settings):
    assert settings.batch_cfg
    result = runner.run(negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    assert result.parameters.true_cfg and blocks_run == [2] * result.parameters.steps_run
    blocks_run.clear()
    result = runner.run()  # no negative prompt: no CFG, one pass a step
    assert not result.parameters.true_cfg and blocks_run == [1] * result.parameters.steps_run


def test_a_callback_that_replaces_the_prompt_embeddings_gets_them_used(model, cfg_batching):
    other = model.pipe.encode_prompt("a bowl of green soup", device=model.device)[0]

    def swap(_pipe, step, _t, _tensors):
        return {"prompt_embeds": other} if step == 1 else {}

    results = []
    for on in (False, True):
        cfg_batching(on)
        results.append(latents(model, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0, callback=swap))
    unswapped = latents(model, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    assert (results[0] - results[1]).abs().max() < NOISE
    assert (results[0] - unswapped).abs().max() > 100 * NOISE  # the swap mattered


def test_an_attention_backend_gives_the_same_result(model, settings):
    from worker.model import load_model

    chosen = load_model(settings.model_copy(update={"attention_backend": "_native_math"}))
    assert chosen.pipe is not model.pipe and chosen.describe()["attention_backend"] == "_native_math"
    plain = latents(model, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    assert (latents(chosen, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0) - plain).abs().max() < NOISE


def test_an_unknown_attention_backend_is_refused_at_start_naming_the_setting(settings):
    from worker.model import load_model

    with pytest.raises(ValueError) as caught:
        load_model(settings.model_copy(update={"attention_backend": "fastest"}))
    message = str(caught.value)
    assert message.startswith("INPAINT_ATTENTION_BACKEND=fastest") and "_native_cudnn" in message


@pytest.mark.slow
def test_compiled_blocks_are_ready_after_warm_up_for_any_size_and_prompt(model, settings):
    """Warm-up compiles every kind of step once: calls of new sizes and prompt lengths compile nothing."""
    from torch._dynamo.utils import counters

    from worker.model import load_model, warm_up

    compiled = load_model(settings.model_copy(update={"compile": "on"}))
    assert compiled.compiled and compiled.describe()["compiled"]
    warm_up(compiled, 64, steps=1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for call in (dict(negative_prompt=LONG_NEGATIVE + ", dark", true_cfg_scale=4.0),
                 dict(prompt="one word"),
                 dict(negative_prompt="a red apple on a table", true_cfg_scale=4.0)):
        fast = latents(compiled, size=(96, 80), **call)
        assert counters["stats"]["unique_graphs"] == graphs  # nothing new compiled
        assert (fast - latents(model, size=(96, 80), **call)).abs().max() < NOISE


def test_blocks_that_fail_to_compile_run_uncompiled_and_the_worker_serves(model, settings, caplog):
    """A hook that breaks the graph (a plugin's, a cache's) makes compiling fail at warm-up: the model still runs."""
    import torch._dynamo

    from worker.model import load_model, warm_up

    compiled = load_model(settings.model_copy(update={"compile": "on", "prompt_cache_size": 7}))
    assert compiled.compiled and compiled.pipe is not model.pipe
    handle = compiled.pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda *_: torch._dynamo.graph_break())
    try:
        warm_up(compiled, 32, steps=1)
    finally:
        handle.remove()
    assert not compiled.compiled and not compiled.describe()["compiled"]
    assert "compiling the transformer's blocks failed" in caplog.text
    call = dict(negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    assert (latents(compiled, **call) - latents(model, **call)).abs().max() < NOISE


def test_the_lossy_step_cache_skips_blocks_only_when_asked(model, settings):
    from worker.model import load_model

    THRESHOLD = 3.0

    cached = load_model(settings.model_copy(update={"step_cache": THRESHOLD}))
    assert cached.pipe is not model.pipe and cached.describe()["step_cache"] == THRESHOLD
    assert model.describe()["step_cache"] == 0
    call = dict(negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    with batches_of(cached, 0) as first, batches_of(cached, 1) as rest:
        lossy = latents(cached, **call)
    assert len(first) == 4 and 1 <= len(rest) < 4  # every step ran the first block, some skipped the rest
    assert (lossy - latents(model, **call)).abs().max() > 10 * NOISE  # lossy: a different result


def test_a_job_stopped_mid_run_leaves_no_step_cache_state_to_the_next_job_of_another_size(settings, plugins,
                                                                                          tmp_path):
    """Upstream resets the step cache only when a call finishes; a cancelled call's cached tensor was compared with
    the next call's, and every job of another size failed until one of the old size succeeded."""
    from worker import job
    from worker.errors import Cancelled
    from worker.inputs import LocalFetcher
    from worker.model import load_model
    from worker.outputs import DirectorySink

    cached = load_model(settings.model_copy(update={"step_cache": 3.0}))

    def run(width: int, height: int, cancel_requested=None):
        request = {"prompt": "a red apple", "image": data_url(photo(width, height)),
                   "mask_image": data_url(box_mask(width, height)), "num_inference_steps": 6, "strength": 1.0,
                   "seed": 1}
        return job.run(request, model=cached, plugins=plugins, fetcher=LocalFetcher(10**7),
                       sink=DirectorySink(tmp_path / f"{width}x{height}"), settings=settings,
                       cancel_requested=cancel_requested)

    checks = iter(range(100))
    with pytest.raises(Cancelled, match="at step 3 of 6"):
        run(64, 64, cancel_requested=lambda: next(checks) >= 2)
    result = run(96, 64)
    assert (result.images[0].width, result.images[0].height) == (96, 64)


def test_the_step_cache_and_forced_compilation_are_refused_together():
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="INPAINT_STEP_CACHE and INPAINT_COMPILE=on"):
        Settings(step_cache=0.1, compile="on")


def test_an_attention_backend_without_masks_runs_unequal_prompts_apart(model, settings, caplog):
    """torch's flash kernel takes no mask (nor do flash-attn 2/3): a padded batch is impossible, a plain one is not."""
    from worker.model import load_model

    flash = load_model(settings.model_copy(update={"attention_backend": "_native_flash"}))
    with batches_of(flash) as batches:
        unequal = latents(flash, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
        assert "takes no mask" in caplog.text
        assert batches[-8:] == [1] * 8  # then every step as two passes, without trying again
        batches.clear()
        equal = latents(flash, negative_prompt="a red apple on a table", true_cfg_scale=4.0)
        assert batches == [2] * 4  # same length: no mask needed, still one batch
    for result, negative in ((unequal, LONG_NEGATIVE), (equal, "a red apple on a table")):
        assert (result - latents(model, negative_prompt=negative, true_cfg_scale=4.0)).abs().max() < NOISE


def test_fp8_blocks_hold_float8_weights_and_change_the_result_only_a_little(model, settings):
    from worker.model import load_model
    from worker.speed import Fp8Linear

    def block_bytes(loaded) -> int:
        blocks = loaded.pipe.transformer.transformer_blocks
        return sum(t.numel() * t.element_size() for t in [*blocks.parameters(), *blocks.buffers()])

    fp8 = load_model(settings.model_copy(update={"fp8": True}))
    assert fp8.pipe is not model.pipe and fp8.describe()["fp8"] and not model.describe()["fp8"]
    layers = [m for m in fp8.pipe.transformer.transformer_blocks.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 28 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert not any(type(m) is torch.nn.Linear for m in fp8.pipe.transformer.transformer_blocks.modules())
    assert block_bytes(fp8) < 0.35 * block_bytes(model)  # float32 weights to float8, plus a scale per channel
    call = dict(negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    lossy, plain = latents(fp8, **call), latents(model, **call)
    assert (lossy - plain).abs().max() > 10 * NOISE  # lossy: a different result
    assert (lossy - plain).norm() / plain.norm() < 0.01  # but float8 rounding, not a broken layer


def test_a_worker_started_with_INPAINT_FP8_runs_float8_jobs_and_says_so(tiny_model_dir, plugins, tmp_path,
                                                                        monkeypatch):
    from tests.support import Runner
    from worker.model import load_model
    from worker.settings import Settings
    from worker.speed import Fp8Linear

    monkeypatch.setenv("INPAINT_FP8", "true")
    settings = Settings(model=str(tiny_model_dir), cache_dir=tmp_path, progress_interval_s=0)
    model = load_model(settings)
    assert any(isinstance(layer, Fp8Linear) for layer in model.pipe.transformer.modules())
    result = Runner(model, plugins, settings, tmp_path).run(negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
    assert result.model["fp8"] is True and result.parameters.true_cfg


def test_fp8_weights_stay_float8_through_a_dtype_cast_and_sequential_offload_is_refused():
    from pydantic import ValidationError

    from worker.settings import Settings
    from worker.speed import Fp8Linear

    layer = Fp8Linear(torch.nn.Linear(32, 16))
    x = torch.randn(3, 32)
    before = layer(x)
    layer.to(torch.bfloat16)  # e.g. a plugin calling pipe.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert (layer(x.bfloat16()).float() - before).abs().max() < 0.1
    with pytest.raises(ValidationError, match="INPAINT_FP8 and INPAINT_OFFLOAD=sequential"):
        Settings(fp8=True, offload="sequential")


def test_the_masked_image_is_not_encoded_for_nothing_and_the_result_is_upstreams(model):
    """Upstream VAE-encodes the masked image and never reads it: the worker's pipeline encodes the image alone."""
    from diffusers import QwenImageInpaintPipeline

    upstream = SimpleNamespace(pipe=QwenImageInpaintPipeline(**model.pipe.components))
    upstream.pipe.set_progress_bar_config(disable=True)
    encodes: list[int] = []
    handle = model.pipe.vae.encoder.register_forward_hook(lambda *_: encodes.append(1))
    try:
        theirs = latents(upstream, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
        assert len(encodes) == 2  # the image, and the masked image
        encodes.clear()
        ours = latents(model, negative_prompt=LONG_NEGATIVE, true_cfg_scale=4.0)
        assert len(encodes) == 1
    finally:
        handle.remove()
    assert (ours - theirs).abs().max() < NOISE


def test_a_thin_stroke_between_the_grids_samples_is_repainted(model):
    """The model repaints cells of vae_scale_factor pixels; upstream samples one pixel a cell, so a stroke
    between the samples came back as the encoded input, as with no mask at all. Every cell it touches is
    repainted."""
    from diffusers import QwenImageInpaintPipeline
    from PIL import Image

    from worker.model import generator

    f = model.pipe.vae_scale_factor
    stroke = box_mask(64, 64, (0, 4 * f + 1, 64, 4 * f + 3))  # two rows between sampled rows
    upstream = QwenImageInpaintPipeline(**model.pipe.components)
    upstream.set_progress_bar_config(disable=True)

    def final(pipe, mask):
        return pipe(prompt="a scratch", image=photo(), mask_image=mask, height=64, width=64, num_inference_steps=4,
                    strength=1.0, generator=generator(1), output_type="latent").images

    nothing = Image.new("L", (64, 64), 0)
    assert torch.equal(final(upstream, stroke), final(upstream, nothing))  # the stroke is ignored
    repainted = (final(model.pipe, stroke) - final(model.pipe, nothing)).abs().amax(dim=-1)
    cells = repainted.reshape(32 // f, 32 // f)  # packed: one token a 2x2 block of cells; row 2 holds the stroke
    assert cells[2].min() > 0 and cells.sum() == cells[2].sum()  # the stroke's cells, and only those
