"""Adapters per job and fast mode: LoRA files written the way trainers write them (random weights for the tiny
model, the right key names and ranks), applied from the operator's library, swapped on a warm worker, refused
cleanly when they do not fit; fast mode's steps, schedule and record."""

from __future__ import annotations

import json
import pickle
import re
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.support import Runner, box_mask, job_request, photo, stored_pixels, upload, wait_for_step
from worker.errors import InvalidRequest

# layers of the tiny transformer a trainer's LoRA typically covers: attention, MLP, modulation, and top-level ones
LAYERS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
          "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.img_mlp.net.0.proj",
          "transformer_blocks.0.txt_mod.1", "img_in", "proj_out")
FORMATS = ("diffusers", "kohya", "ai-toolkit", "lightning", "peft")


def lora_weights(model, seed: int, rank: int = 4, layers=LAYERS, scale: float = 0.3) -> dict:
    """Random down and up weights of `rank` for each layer, sized from the model's own layers."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.pipe.transformer.named_modules())
    out = {}
    for name in layers:
        base = modules[name].get_base_layer() if hasattr(modules[name], "get_base_layer") else modules[name]
        out[name] = (torch.randn(rank, base.in_features, generator=generator) * scale,
                     torch.randn(base.out_features, rank, generator=generator) * scale)
    return out


def write_lora(path: Path, weights: dict, fmt: str, alpha: float | None = None) -> Path:
    """The file a trainer writes: diffusers' save_lora_weights (with its metadata), kohya's sd-scripts
    (lora_unet_*, lora_down/up, alpha), ai-toolkit and ComfyUI (diffusion_model.*), Qwen-Image-Lightning's (bare
    names, lora_down/up, alpha), PEFT's (lora_A.default)."""
    if fmt == "diffusers":
        from diffusers import QwenImagePipeline

        rank = next(iter(weights.values()))[0].shape[0]
        layers = {f"{name}.lora_{ab}.weight": w for name, (a, b) in weights.items() for ab, w in (("A", a), ("B", b))}
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(weights)).to_dict()  # as diffusers'
        QwenImagePipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                            transformer_lora_adapter_metadata=config)  # training scripts write it
        return path
    state = {}
    for name, (a, b) in weights.items():
        if fmt == "kohya":
            key, down, up = f"lora_unet_{name.replace('.', '_')}", "lora_down", "lora_up"
        elif fmt == "ai-toolkit":
            key, down, up = f"diffusion_model.{name}", "lora_A", "lora_B"
        elif fmt == "lightning":
            key, down, up = name, "lora_down", "lora_up"
        else:
            key, down, up = name, "lora_A.default", "lora_B.default"
        state[f"{key}.{down}.weight"], state[f"{key}.{up}.weight"] = a.contiguous(), b.contiguous()
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory, model) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "style-a.safetensors", lora_weights(model, 1), "kohya", alpha=8)
    write_lora(folder / "style-b.safetensors", lora_weights(model, 2, rank=8), "ai-toolkit")
    write_lora(folder / "lightning.safetensors", lora_weights(model, 3, rank=16), "lightning", alpha=2)
    return folder


@pytest.fixture(scope="module")
def lora_settings(settings, library):
    return settings.model_copy(update={"lora_dir": library, "fast_adapter": "lightning", "lora_max_rank": 16})


@pytest.fixture(scope="module")
def lora_model(lora_settings):
    from worker.model import load_model

    return load_model(lora_settings)


@pytest.fixture
def lora_runner(lora_model, plugins, lora_settings, tmp_path) -> Runner:
    return Runner(lora_model, plugins, lora_settings, tmp_path)


def latents(pipe, **call) -> torch.Tensor:
    from worker.model import generator

    return pipe(prompt="a red apple", image=photo(), mask_image=box_mask(), height=64, width=64, strength=1.0,
                num_inference_steps=3, generator=generator(1), output_type="latent", **call).images


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_trainer_format_gives_what_diffusers_own_loader_gives(fmt, model, lora_model, direct_pipe, library,
                                                                   tmp_path):
    from worker.schema import AdapterRef

    path = write_lora(library / f"format-{fmt}.safetensors", lora_weights(model, 10, rank=4), fmt,
                      alpha=None if fmt in ("ai-toolkit", "peft") else 2)
    lora_model.adapters.apply([AdapterRef(ref=path.stem)])
    ours = latents(lora_model.pipe)
    direct_pipe.load_lora_weights(str(path), adapter_name="upstream")
    try:
        upstream = latents(direct_pipe)
    finally:
        direct_pipe.unload_lora_weights()
    lora_model.adapters.apply([])
    assert (ours - upstream).abs().max() < 1e-4
    assert (ours - latents(lora_model.pipe)).abs().max() > 1e-2  # and the adapter did something


def test_an_adapter_changes_the_image_scale_0_gives_the_base_and_nothing_is_left_for_the_next_job(
        runner, lora_runner, lora_model):
    weight = lora_model.pipe.transformer.transformer_blocks[0].attn.to_q.get_base_layer().weight
    pointer, total = weight.data_ptr(), weight.sum().item()
    base = runner.pixels(runner.run())  # a worker without an adapter library: no slots at all
    styled = lora_runner.run(adapters=[{"ref": "style-a"}])
    assert (lora_runner.pixels(styled) != base).any()
    used = styled.parameters.adapters
    assert [(a.name, a.scale, a.shift) for a in used] == [("style-a", 1.0, None)]
    assert re.fullmatch(r"[0-9a-f]{64}", used[0].sha256)
    assert np.array_equal(lora_runner.pixels(lora_runner.run(adapters=[{"ref": "style-a", "scale": 0}])), base)
    assert np.array_equal(lora_runner.pixels(lora_runner.run()), base)  # the slots hold exact zeros again
    assert weight.data_ptr() == pointer and weight.sum().item() == total  # the base weights: never reloaded, untouched


def test_two_adapters_in_one_job_and_the_lora_scale_of_attention_kwargs(lora_runner):
    one = lora_runner.pixels(lora_runner.run(adapters=[{"ref": "style-a"}]))
    both = lora_runner.run(adapters=[{"ref": "style-a"}, {"ref": "style-b", "scale": 0.5}])
    assert (lora_runner.pixels(both) != one).any()
    assert [(a.name, a.scale) for a in both.parameters.adapters] == [("style-a", 1.0), ("style-b", 0.5)]
    halved = lora_runner.run(adapters=[{"ref": "style-a", "scale": 2.0}], attention_kwargs={"scale": 0.5})
    assert halved.parameters.adapters[0].scale == 1.0  # upstream's LoRA scale multiplies every adapter's
    assert np.array_equal(lora_runner.pixels(halved), one)


def test_a_cancelled_job_leaves_no_adapter_behind(runner, lora_runner):
    from worker.errors import Cancelled

    steps = []

    def cancel_at_step_two() -> bool:
        steps.append(1)
        return len(steps) > 2

    with pytest.raises(Cancelled):
        lora_runner.run(adapters=[{"ref": "style-b"}], cancel_requested=cancel_at_step_two)
    assert np.array_equal(lora_runner.pixels(lora_runner.run()), runner.pixels(runner.run()))


@pytest.mark.parametrize(("adapters", "field", "words"), [
    ([{"ref": "../style-a"}], "adapters.0.ref", "no '/', '..' or URL"),
    ([{"ref": "https://example.com/x.safetensors"}], "adapters.0.ref", "not a name in the adapter library"),
    ([{"ref": "loras/style-a"}], "adapters.0.ref", "not a name in the adapter library"),
    ([{"ref": "style-a.ckpt"}], "adapters.0.ref", "pickle"),
    ([{"ref": "nobody"}], "adapters.0.ref", "no adapter named 'nobody'"),
    ([{"ref": "style-a", "scale": 1e9}], "adapters.0.scale", "less than or equal to 100"),
    ([{"ref": "style-a", "path": "/etc"}], "adapters.0.path", "unknown field"),
    ([{"ref": "style-a"}] * 3, "adapters", "at most 2 a job"),
    ([{"ref": "style-a", "shift": 3}, {"ref": "style-b", "shift": 2}], "adapters", "different scheduler shifts"),
])
def test_bad_adapter_requests_are_refused_naming_the_field(lora_runner, adapters, field, words):
    with pytest.raises(InvalidRequest) as caught:
        lora_runner.run(adapters=adapters)
    assert caught.value.field == field and words in caught.value.message, caught.value.message


def test_a_worker_without_a_library_refuses_adapters_and_fast_mode(runner):
    for fields, field in (({"adapters": [{"ref": "style-a"}]}, "adapters"), ({"mode": "fast"}, "mode")):
        with pytest.raises(InvalidRequest) as caught:
            runner.run(**fields)
        assert caught.value.field == field and "INPAINT_" in caught.value.message


class Unpickled:
    """What a hostile pickle does when it is read: here, it leaves a file behind."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def wrong_files(model, folder: Path) -> dict[str, str]:
    """LoRA files that must not load, each with the words its refusal says."""
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(sdxl, folder / "sdxl-style.safetensors")
    qwen_full = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(16, 3072),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 16)}
    save_file(qwen_full, folder / "qwen-image-full.safetensors")
    write_lora(folder / "rank-128.safetensors", lora_weights(model, 4, rank=32), "lightning", alpha=1)
    save_file({"transformer.text_model.encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 16),
               "transformer.text_model.encoder.layers.0.q_proj.lora_B.weight": torch.zeros(16, 4),
               "text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 16)}, folder / "text-encoder.safetensors")
    Unpickled.marker = folder / "UNPICKLED"
    (folder / "pickled.safetensors").write_bytes(pickle.dumps(Unpickled()))
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return {"sdxl-style": "is not a linear layer of this model's transformer",
            "qwen-image-full": "maps 48 to 48 features here; the LoRA's down weight is [16, 3072]",
            "rank-128": "rank 32, over this worker's 16 (INPAINT_LORA_MAX_RANK)",
            "text-encoder": "outside the transformer",
            "pickled": "pickle (torch.save) file, refused unread",
            "garbage": "not a readable safetensors file"}


def test_a_lora_that_does_not_fit_is_refused_before_any_step_and_the_worker_goes_on(lora_runner, runner, library,
                                                                                    model):
    steps = []
    for name, words in wrong_files(model, library).items():
        with pytest.raises(InvalidRequest) as caught:
            lora_runner.run(adapters=[{"ref": "style-a"}, {"ref": name}], cancel_requested=lambda: steps.append(1))
        assert caught.value.field == "adapters.1.ref" and words in caught.value.message, caught.value.message
    assert not steps  # each refused before its first step
    assert not (library / "UNPICKLED").exists()  # the pickle was never read as one
    assert np.array_equal(lora_runner.pixels(lora_runner.run()), runner.pixels(runner.run()))


def test_caps_on_size_and_the_memory_cache_least_recently_used_out(lora_settings, library, model, plugins, tmp_path):
    from worker import metrics
    from worker.model import load_model

    small = lora_settings.model_copy(update={"lora_max_bytes": 1000})
    with pytest.raises(InvalidRequest, match="over this worker's cap of 1000 .INPAINT_LORA_MAX_BYTES."):
        Runner(load_model(small), plugins, small, tmp_path).run(adapters=[{"ref": "style-a"}])
    one = lora_settings.model_copy(update={"lora_cache_size": 1})
    loaded = load_model(one)
    run = Runner(loaded, plugins, one, tmp_path).run

    def uses(source: str) -> float:
        return metrics.ADAPTER_USES.labels(source)._value.get()

    before = {source: uses(source) for source in ("memory", "library")}
    first = run(adapters=[{"ref": "style-a"}])
    run(adapters=[{"ref": "style-a"}])
    run(adapters=[{"ref": "style-b"}])  # style-a out
    run(adapters=[{"ref": "style-a"}])
    assert uses("library") - before["library"] == 3 and uses("memory") - before["memory"] == 1
    assert len(loaded.adapters.loaded) == 1
    write_lora(library / "style-a.safetensors", lora_weights(model, 99), "kohya", alpha=8)  # a new version
    changed = run(adapters=[{"ref": "style-a"}])
    assert changed.parameters.adapters[0].sha256 != first.parameters.adapters[0].sha256
    write_lora(library / "style-a.safetensors", lora_weights(model, 1), "kohya", alpha=8)  # as the others expect


@pytest.mark.slow
def test_the_disk_cache_of_s3_adapters_keeps_the_most_recently_used_within_its_cap(stack, model, settings, plugins,
                                                                                  tmp_path, monkeypatch):
    """INPAINT_LORA_DISK_CACHE_BYTES: files downloaded from the library's bucket stay on disk (read from there, not
    downloaded again) until the least recently used must make room. Room here for two of the three files."""
    from worker import metrics
    from worker.model import load_model
    from worker.stack import TEST_CREDENTIALS

    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    s3 = stack.s3.client()
    s3.create_bucket(Bucket="cached-loras")
    sizes = []
    for index, name in enumerate(("one", "two", "three")):
        path = write_lora(tmp_path / f"{name}.safetensors", lora_weights(model, 10 + index), "kohya", alpha=8)
        s3.put_object(Bucket="cached-loras", Key=f"{name}.safetensors", Body=path.read_bytes())
        sizes.append(path.stat().st_size)
    cached = settings.model_copy(update={
        "lora_buckets": ["cached-loras"], "lora_dir": None, "cache_dir": tmp_path / "cache",
        "lora_disk_cache_bytes": sizes[0] + sizes[1] + sizes[2] // 2, "lora_cache_size": 1,
        "s3_endpoint_url": stack.s3.endpoint})
    run = Runner(load_model(cached), plugins, cached, tmp_path).run

    def uses() -> dict[str, float]:
        return {source: metrics.ADAPTER_USES.labels(source)._value.get() for source in ("s3", "disk")}

    sources = []
    for name in ("one", "two", "one", "three", "one", "two"):  # memory holds one: each job loads its adapter
        before = uses()
        run(adapters=[{"ref": name}])
        sources.append(next(source for source, count in uses().items() if count > before[source]))
    # "two" was the least recently used when "three" needed room; "three" when "two" came back
    assert sources == ["s3", "s3", "disk", "s3", "disk", "s3"]
    files = list((tmp_path / "cache" / "adapters").glob("*.safetensors"))
    assert len(files) == 2 and sum(path.stat().st_size for path in files) <= cached.lora_disk_cache_bytes


def test_a_plugin_supplies_a_jobs_adapters_in_its_preprocess_hook(lora_runner, runner):
    from worker.hooks import hookimpl
    from worker.plugins import Plugins

    class TenantStyle:
        @hookimpl
        def inpaint_preprocess(self, job):
            if job.request.output.prefix == "tenant-7":
                job.adapters.append({"ref": "style-b", "scale": 0.5})

    manager = Plugins(load_entry_points=False)
    manager.register(TenantStyle(), "tenant_style")
    styled = lora_runner.run(manager, output={"prefix": "tenant-7"})
    assert [(a.name, a.scale) for a in styled.parameters.adapters] == [("style-b", 0.5)]
    direct = lora_runner.run(adapters=[{"ref": "style-b", "scale": 0.5}])
    assert np.array_equal(lora_runner.pixels(styled), lora_runner.pixels(direct))

    class Broken:
        @hookimpl
        def inpaint_preprocess(self, job):
            job.adapters.append({"ref": "../etc/passwd"})

    broken = Plugins(load_entry_points=False)
    broken.register(Broken(), "broken")
    with pytest.raises(InvalidRequest) as caught:
        lora_runner.run(broken)
    assert caught.value.field == "adapters.0.ref" and "set by a preprocess hook" in caught.value.message


# --- fast mode ---------------------------------------------------------------------------------------------------

def test_fast_mode_runs_the_distilled_adapter_its_steps_and_schedule_without_true_cfg(lora_runner, lora_model):
    scheduler = lora_model.pipe.scheduler
    seen = []
    fast = lora_runner.run(mode="fast", negative_prompt="blurry", strength=1.0, num_inference_steps=None,
                           reporter=lambda progress: seen.append(progress.total_steps))
    p = fast.parameters
    assert (p.mode, p.num_inference_steps, p.steps_run, p.true_cfg, p.true_cfg_scale) == ("fast", 8, 8, False, 1.0)
    assert [(a.name, a.scale, a.shift) for a in p.adapters] == [("lightning", 1.0, 3.0)]
    assert {total for total in seen if total} == {8}  # progress counts the steps that run
    assert lora_model.pipe.scheduler is scheduler  # the shifted schedule was this job's only
    same_without_shift = lora_runner.run(adapters=[{"ref": "lightning"}], num_inference_steps=8, strength=1.0,
                                         negative_prompt="blurry", true_cfg_scale=1.0)
    assert (lora_runner.pixels(fast) != lora_runner.pixels(same_without_shift)).any()  # the shift changed the steps
    assert same_without_shift.parameters.mode == "standard"


@pytest.mark.parametrize(("fields", "steps", "run"), [
    ({}, 8, 5),  # the default strength, 0.6: the schedule is trimmed as always, 8 - int(8 x 0.4) = 5 steps run
    ({"strength": 0.3}, 8, 3),  # 8 - int(8 x 0.7)
    ({"num_inference_steps": 4, "strength": 1.0}, 4, 4),  # a request's own steps stand
])
def test_fast_mode_with_strength_runs_the_trimmed_schedule_and_says_so(lora_runner, fields, steps, run):
    p = lora_runner.run(mode="fast", **{"num_inference_steps": None, **fields}).parameters  # None: left out
    assert (p.num_inference_steps, p.steps_run) == (steps, run)


def test_fast_mode_with_a_schedule_that_does_not_fit_its_steps_is_refused_naming_them(lora_runner):
    sigmas = [1 - k / 50 for k in range(50)]  # one a step of the request's 50 (its default), not fast mode's 8
    with pytest.raises(InvalidRequest) as caught:
        lora_runner.run(mode="fast", sigmas=sigmas, num_inference_steps=None)
    assert caught.value.field == "sigmas" and "fast mode runs 8 steps" in caught.value.message


def test_a_shifted_schedule_is_lightnings_and_is_put_back():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from worker.pipeline import InpaintPipeline

    class Holder:
        scheduler = FlowMatchEulerDiscreteScheduler()

    holder = Holder()
    own = holder.scheduler
    with InpaintPipeline.scheduler_shift_as(holder, 3.0):
        shifted = holder.scheduler
        shifted.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=np.log(3.0))
        t = np.linspace(1.0, 1 / 8, 8)
        assert np.allclose(shifted.sigmas[:-1].numpy(), 3 * t / (1 + 2 * t), atol=1e-6)
    assert holder.scheduler is own


def test_settings_for_adapters_are_checked_at_start():
    from pydantic import ValidationError

    from worker.settings import Settings

    for bad, words in (({"fast_adapter": "lightning"}, "set INPAINT_LORA_DIR or INPAINT_LORA_BUCKETS"),
                       ({"lora_dir": "/x", "fast_adapter": "../x"}, "not a path or URL"),
                       ({"lora_dir": "/x", "offload": "sequential"}, "INPAINT_OFFLOAD=model"),
                       ({"lora_dir": "/x", "fast_steps": 300}, "over INPAINT_MAX_STEPS")):
        with pytest.raises(ValidationError, match=re.escape(words)):
            Settings(**bad)


@pytest.mark.slow  # compiles the blocks
def test_swapping_adapters_under_compiled_blocks_compiles_nothing_new(lora_settings, runner, plugins, tmp_path):
    from torch._dynamo.utils import counters

    from worker.model import load_model, warm_up

    compiled_settings = lora_settings.model_copy(update={"compile": "on"})
    compiled = load_model(compiled_settings)
    warm_up(compiled, 64, steps=1)
    graphs = counters["stats"]["unique_graphs"]
    run = Runner(compiled, plugins, compiled_settings, tmp_path).run
    images = {}
    for name, fields in (("a", {"adapters": [{"ref": "style-a"}]}), ("b", {"adapters": [{"ref": "style-b"}]}),
                         ("none", {}), ("fast", {"mode": "fast"}), ("a again", {"adapters": [{"ref": "style-a"}]})):
        images[name] = Runner.pixels(run(**fields))
    assert counters["stats"]["unique_graphs"] == graphs  # hotswapped: nothing recompiled
    assert compiled.compiled
    assert np.abs(images["a"] - images["a again"]).max() == 0
    assert np.abs(images["none"] - runner.pixels(runner.run())).max() <= 1  # compiled: rounding at most


# --- through the queue: real workers, Redis and S3 ------------------------------------------------------------------

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def queue_library(stack, model, tmp_path_factory) -> dict:
    """The library two ways: a folder (style-a, lightning) and an S3 bucket with a prefix (style-b)."""
    folder = tmp_path_factory.mktemp("queue-loras")
    write_lora(folder / "style-a.safetensors", lora_weights(model, 1), "kohya", alpha=8)
    write_lora(folder / "lightning.safetensors", lora_weights(model, 3, rank=16), "lightning", alpha=2)
    wrong_files(model, folder)
    s3 = stack.s3.client()
    s3.create_bucket(Bucket="loras")
    path = write_lora(folder / "upload-b.safetensors", lora_weights(model, 2, rank=8), "ai-toolkit")
    s3.put_object(Bucket="loras", Key="library/style-b.safetensors", Body=path.read_bytes())
    path.unlink()
    return {"INPAINT_LORA_DIR": str(folder), "INPAINT_LORA_BUCKETS": "loras/library",
            "INPAINT_CACHE_DIR": str(tmp_path_factory.mktemp("worker-cache")),  # the disk cache of S3 adapters
            "INPAINT_FAST_ADAPTER": "lightning", "INPAINT_LORA_MAX_RANK": "16"}


def lora_worker(stack, client_app, worker_env, queue_library, name: str, queue: str, **env):
    return stack.start_worker(f"{name}@{HOST}", INPAINT_QUEUE=queue, **worker_env, **queue_library,
                              **env).wait_ready(client_app)


def queue_client(stack, queue: str):
    from worker.app import make_app
    from worker.client import InpaintClient

    return InpaintClient(make_app(stack.settings(queue=queue), client=True))


def done(client, request: dict):
    status = client.wait(client.submit(request), timeout=180)
    assert status.state == "SUCCESS", status.error
    return status


@pytest.mark.slow
def test_interleaved_jobs_each_give_what_they_give_alone_on_a_fresh_worker(stack, client, worker, worker_env,
                                                                           queue_library):
    from worker.stack import free_port

    base = job_request(stack)
    a, b = {**base, "adapters": [{"ref": "style-a"}]}, {**base, "adapters": [{"ref": "style-b", "scale": 0.7}]}
    fast = {**base, "mode": "fast", "strength": 1.0}
    alone = {"none": stored_pixels(stack, done(client, base))}  # a worker with no adapter library at all
    fresh_client = queue_client(stack, "lora-fresh")
    for name, request in (("a", a), ("b", b), ("fast", fast)):
        fresh = lora_worker(stack, fresh_client.app, worker_env, queue_library, f"fresh-{name}", "lora-fresh")
        try:
            alone[name] = stored_pixels(stack, done(fresh_client, request))
        finally:
            fresh.stop()

    port = free_port()
    lora = queue_client(stack, "lora")
    warm = lora_worker(stack, lora.app, worker_env, queue_library, "lora", "lora", INPAINT_METRICS_PORT=str(port))
    try:
        seen = []
        for name, request in (("a", a), ("b", b), ("none", base), ("fast", fast), ("a", a), ("b", b)):
            seen.append((name, stored_pixels(stack, done(lora, request))))
        failing = lora.wait(lora.submit({**b, "plugins": {"testkit": {"raise": "mid-step"}}}), timeout=120)
        assert failing.state == "FAILURE" and failing.error["code"] == "plugin_error"
        seen.append(("none", stored_pixels(stack, done(lora, base))))
        slow = lora.submit({**a, "num_inference_steps": 40, "plugins": {"testkit": {"step_s": 0.1}}})
        wait_for_step(lora, slow, 2)
        lora.cancel(slow)
        assert lora.wait(slow, timeout=60).error["code"] == "cancelled"
        seen.append(("none", stored_pixels(stack, done(lora, base))))
        wrong = lora.wait(lora.submit({**base, "adapters": [{"ref": "qwen-image-full"}]}), timeout=120)
        assert wrong.state == "FAILURE" and wrong.error["code"] == "invalid_request", wrong.error
        assert wrong.error["field"] == "adapters.0.ref" and "does not fit this model" in wrong.error["message"]
        last = done(lora, b)  # the worker goes on serving
        seen.append(("b", stored_pixels(stack, last)))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        warm.stop()
    for name, pixels in seen:
        assert np.array_equal(pixels, alone[name]), name
    assert not np.array_equal(alone["a"], alone["none"]) and not np.array_equal(alone["a"], alone["b"])
    record = json.loads(stack.s3.client().get_object(Bucket="outputs", Key=f"jobs/{last.job_id}/result.json")["Body"]
                        .read())
    assert record["parameters"]["adapters"] == [
        {"name": "style-b", "sha256": last.result.parameters.adapters[0].sha256, "scale": 0.7, "shift": None}]
    assert record["parameters"]["mode"] == "standard"
    assert 'inpaint_adapter_uses_total{source="memory"}' in metrics
    # style-b was downloaded from S3 by the first fresh worker: this one found it in the shared disk cache
    assert re.search(r'inpaint_adapter_uses_total\{source="disk"\} [1-9]', metrics)
    assert not re.search(r'inpaint_adapter_uses_total\{source="s3"\} [1-9]', metrics)
    assert len(list((Path(queue_library["INPAINT_CACHE_DIR"]) / "adapters").glob("*.safetensors"))) == 1
    assert re.search(r"inpaint_adapter_load_seconds_count [1-9]", metrics)


@pytest.mark.slow
def test_a_queued_fast_job_says_which_mode_ran_and_counts_its_steps(stack, worker_env, queue_library):
    fast_client = queue_client(stack, "lora-fast")
    fast = lora_worker(stack, fast_client.app, worker_env, queue_library, "fast", "lora-fast")
    try:
        request = {k: v for k, v in job_request(stack).items() if k != "num_inference_steps"}  # fast mode's 8
        status = done(fast_client, {**request, "mode": "fast", "negative_prompt": "blurry",
                                    "image": upload(stack, "fast/photo.png", photo())})
    finally:
        fast.stop()
    p = status.result.parameters
    assert (p.mode, p.steps_run, p.true_cfg) == ("fast", 5, False)
    assert status.result.model["adapter_slots"] == {"slots": 2, "rank": 16}
