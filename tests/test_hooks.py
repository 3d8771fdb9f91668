"""Plugins: the order hooks run in, what a plugin may change, blocking, and failures that stay contained."""

from __future__ import annotations

import os
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.support import box_mask, data_url, photo
from worker.errors import InvalidRequest, PluginError
from worker.hooks import hookimpl
from worker.plugins import Plugins


def manager_with(*plugins: tuple[str, object], blocked=()) -> Plugins:
    manager = Plugins(blocked=blocked, load_entry_points=False)
    for name, plugin in plugins:
        manager.register(plugin, name)
    return manager


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def inpaint_preprocess(self, job):
        self.calls.append(("preprocess", job.image.mode, job.mask.mode))

    @hookimpl
    def inpaint_step_end(self, step, total_steps):
        self.calls.append(("step", step, total_steps))

    @hookimpl
    def inpaint_postprocess(self, images):
        self.calls.append(("postprocess", len(images)))

    @hookimpl
    def inpaint_job_finished(self, job, result):
        self.calls.append(("finished", result.job_id == job.id))

    @hookimpl
    def inpaint_job_failed(self, error):
        self.calls.append(("failed", error.code))


def test_hooks_run_in_the_life_of_a_job_order_after_the_builtins(runner):
    recorder = Recorder()
    rgba = photo().convert("RGBA")
    runner.run(manager=manager_with(("recorder", recorder)), image=data_url(rgba), num_inference_steps=5,
               strength=0.6)
    assert recorder.calls == [("preprocess", "RGB", "L"), ("step", 1, 3), ("step", 2, 3), ("step", 3, 3),
                              ("postprocess", 1), ("finished", True)]


def test_a_preprocess_plugin_can_change_the_mask(runner):
    class MoveMask:
        @hookimpl
        def inpaint_preprocess(self, job):
            job.mask = box_mask(64, 64, (40, 40, 60, 60))

    source = photo()
    out = runner.pixels(runner.run(manager=manager_with(("move_mask", MoveMask())), image=data_url(source)))
    original = np.asarray(source).astype(int)
    old_area, new_area = (slice(16, 40), slice(16, 40)), (slice(40, 60), slice(40, 60))
    assert np.array_equal(out[old_area], original[old_area])  # no longer repainted: paste-back keeps it
    assert not np.array_equal(out[new_area], original[new_area])


def test_a_postprocess_plugin_can_change_the_images_after_paste_back(runner):
    class Stamp:
        @hookimpl
        def inpaint_postprocess(self, images):
            stamped = [image.copy() for image in images]
            for image in stamped:
                ImageDraw.Draw(image).rectangle((0, 0, 7, 7), fill=(0, 255, 0))
            return stamped

    out = runner.pixels(runner.run(manager=manager_with(("stamp", Stamp()))))
    assert (out[:8, :8] == [0, 255, 0]).all()


def test_step_end_hook_can_replace_the_latents(runner):
    from safetensors.torch import load_file

    class Zero:
        @hookimpl
        def inpaint_step_end(self, step, total_steps, latents):
            if step == total_steps:
                return {"latents": torch.zeros_like(latents)}
            return None

    result = runner.run(manager=manager_with(("zero", Zero())), output_type="latent")
    assert load_file(result.images[0].location)["latents"].abs().max() == 0
    normal = runner.run(output_type="latent")
    assert load_file(normal.images[0].location)["latents"].abs().max() > 0


def test_a_blocked_plugin_is_not_loaded_or_called(runner):
    recorder = Recorder()
    manager = manager_with(("recorder", recorder), blocked=["recorder"])
    runner.run(manager=manager)
    assert recorder.calls == [] and "recorder" in manager.report.blocked and "recorder" not in manager.names


def test_blocking_a_builtin_turns_its_behaviour_off(runner):
    source = photo()
    manager = Plugins(blocked=["paste_back"], load_entry_points=False)
    out = runner.pixels(runner.run(manager=manager, image=data_url(source)))
    outside = np.asarray(box_mask()) == 0
    assert not np.array_equal(out[outside], np.asarray(source).astype(int)[outside])


def test_a_job_can_turn_a_plugin_off_for_itself(runner):
    recorder = Recorder()
    manager = manager_with(("recorder", recorder))
    runner.run(manager=manager, plugins={"recorder": False})
    assert recorder.calls == []
    runner.run(manager=manager)
    assert recorder.calls


def test_a_plugin_that_raises_fails_only_the_job_that_uses_it(runner):
    class Boom:
        @hookimpl
        def inpaint_step_end(self, step):
            if step == 2:
                raise RuntimeError("kaboom")

    recorder = Recorder()
    manager = manager_with(("boom", Boom()), ("recorder", recorder))
    with pytest.raises(PluginError) as caught:
        runner.run(manager=manager)
    assert caught.value.code == "plugin_error" and caught.value.plugin == "boom"
    assert "'boom'" in caught.value.message and "kaboom" in caught.value.message
    assert ("failed", "plugin_error") in recorder.calls
    assert runner.run(manager=manager, plugins={"boom": False}).images


def install(site, monkeypatch, name: str, module: str, source: str, version: str = "0.1") -> None:
    """A plugin distribution as pip leaves one in `site`: the module and its entry point `name = module`."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[inpaint_worker]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(site))


def test_a_broken_installed_plugin_is_skipped_at_load(runner, tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "broken", "broken_plugin", "raise ImportError('missing dependency: nothing')\n")
    install(tmp_path, monkeypatch, "good", "good_plugin", """
        from worker.hooks import hookimpl
        calls = []

        @hookimpl
        def inpaint_job_finished(result):
            calls.append(result.job_id)
    """)
    manager = Plugins()
    assert "broken" in manager.report.failed and "missing dependency" in manager.report.failed["broken"]
    assert "good" in manager.names and "paste_back" in manager.names
    result = runner.run(manager=manager)
    import good_plugin

    assert good_plugin.calls == [result.job_id]


def test_plugin_options_are_validated_and_reach_the_plugin(runner):
    source = photo()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((28, 28, 35, 35), fill=255)
    grown = runner.pixels(runner.run(image=data_url(source), mask_image=data_url(mask),
                                     plugins={"mask": {"grow": 8}, "paste_back": {"feather": 0}}))
    ring = (slice(22, 26), slice(22, 42))  # outside the drawn mask, inside the grown one
    assert not np.array_equal(grown[ring], np.asarray(source).astype(int)[ring])


def test_hookspecs_each_have_a_docstring():
    from worker import hooks

    specs = [getattr(hooks, name) for name in dir(hooks) if name.startswith("inpaint_")]
    assert len(specs) == 6
    assert all(isinstance(spec, types.FunctionType) and spec.__doc__ for spec in specs)


def test_job_finished_hook_gets_the_result_after_the_files_are_written(runner):
    from pathlib import Path

    seen = []

    class Listener:
        @hookimpl
        def inpaint_job_finished(self, job, result):
            seen.append((job.id, [Path(image.location).is_file() for image in result.images],
                         Path(result.images[0].location).with_name("result.json").is_file()))

    result = runner.run(manager=manager_with(("listener", Listener())), prompt=["a", "b"])
    assert seen == [(result.job_id, [True, True], True)]


def test_job_failed_hook_hears_the_error_and_cannot_replace_it(runner):
    seen = []

    class Listener:
        @hookimpl
        def inpaint_job_failed(self, job, error):
            seen.append((job.id, error.code, error.field))
            raise RuntimeError("a broken failure hook")

    empty = data_url(Image.new("L", (64, 64), 0))
    with pytest.raises(InvalidRequest) as caught:
        runner.run(manager=manager_with(("listener", Listener())), mask_image=empty, job_id="failing-job")
    assert caught.value.field == "mask_image"
    assert seen == [("failing-job", "invalid_request", "mask_image")]


def test_a_plugin_with_a_misspelled_hook_or_a_hook_wrapper_is_reported_and_skipped():
    class Misspelled:
        @hookimpl
        def inpaint_postproces(self, images):
            return images

    class Wrapper:
        @hookimpl(wrapper=True)
        def inpaint_postprocess(self, images):
            return (yield)

    manager = manager_with(("misspelled", Misspelled()), ("wrapper", Wrapper()))
    assert "misspelled" not in manager.names and "wrapper" not in manager.names
    assert "unknown hooks ['inpaint_postproces']" in manager.report.failed["misspelled"]
    assert "inpaint_postprocess" in manager.report.failed["misspelled"]  # the list of real hooks
    assert "wrappers are not supported" in manager.report.failed["wrapper"]
    assert {row["name"]: row["status"] for row in manager.describe()}["wrapper"] == "failed"


def test_a_plugin_whose_pipeline_setup_raises_is_skipped_and_the_others_set_up(model, settings):
    seen = []

    class Broken:
        @hookimpl
        def inpaint_pipeline_loaded(self, pipe):
            raise FileNotFoundError("lora.safetensors")

        @hookimpl
        def inpaint_postprocess(self, images):
            seen.append("broken ran a job")

    class Good:
        @hookimpl
        def inpaint_pipeline_loaded(self, pipe, settings):
            seen.append(("set up", pipe is model.pipe))

    manager = manager_with(("broken", Broken()), ("good", Good()))
    manager.pipeline_loaded(model.pipe, settings)
    assert seen == [("set up", True)]
    assert "broken" not in manager.names and "lora.safetensors" in manager.report.failed["broken"]


def test_outcome_hooks_that_raise_are_logged_and_the_others_still_hear(runner, caplog):
    heard = []

    class Loud:
        @hookimpl(tryfirst=True)
        def inpaint_job_finished(self):
            raise RuntimeError("finished hook broke")

        @hookimpl(tryfirst=True)
        def inpaint_job_failed(self):
            raise RuntimeError("failed hook broke")

    class Listener:
        @hookimpl
        def inpaint_job_finished(self, result):
            heard.append(("finished", result.job_id))

        @hookimpl
        def inpaint_job_failed(self, error):
            heard.append(("failed", error.code))

    manager = manager_with(("loud", Loud()), ("listener", Listener()))
    result = runner.run(manager=manager)  # the job succeeded: a finished hook cannot turn it into a failure
    with pytest.raises(InvalidRequest):
        runner.run(manager=manager, mask_image=data_url(Image.new("L", (64, 64), 0)))
    assert heard == [("finished", result.job_id), ("failed", "invalid_request")]
    assert "'loud' raised in inpaint_job_finished" in caplog.text and "failed hook broke" in caplog.text


class ReturnsOneImage:
    @hookimpl
    def inpaint_postprocess(self, images):
        return images[0]


class ReturnsNoImages:
    @hookimpl
    def inpaint_postprocess(self, images):
        return []


class ReturnsSmallerImages:
    @hookimpl
    def inpaint_postprocess(self, images):
        return [image.resize((32, 32)) for image in images]


class ReturnsRGBAImages:  # JPEG cannot hold it: the job would fail as internal while encoding
    @hookimpl
    def inpaint_postprocess(self, images):
        return [image.convert("RGBA") for image in images]


class ReturnsArrays:
    @hookimpl
    def inpaint_postprocess(self, images):
        return [np.asarray(image) for image in images]


class ReturnsDoubleLatents:  # the transformer would fail on it as internal, naming no plugin
    @hookimpl
    def inpaint_step_end(self, latents):
        return {"latents": latents.double()}


class ReturnsAnImageFromPreprocess:
    @hookimpl
    def inpaint_preprocess(self, job):
        return job.image.rotate(90)


class ReturnsATensor:
    @hookimpl
    def inpaint_step_end(self, latents):
        return latents


class ReturnsAnotherKey:
    @hookimpl
    def inpaint_step_end(self, latents):
        return {"noise": latents}


@pytest.mark.parametrize(("plugin", "expected"), [
    (ReturnsOneImage, "returned an image of 64x64 in mode RGB; expected None or a list of 1 images"),
    (ReturnsNoImages, "returned a list of 0; expected None or a list of 1 images"),
    (ReturnsSmallerImages, "returned an image of 32x32 in mode RGB at index 0; expected an image of 64x64 in mode "
                           "RGB, like the image it replaces"),
    (ReturnsRGBAImages, "returned an image of 64x64 in mode RGBA at index 0; expected an image of 64x64 in mode RGB"),
    (ReturnsArrays, "returned an object of type ndarray at index 0; expected an image of 64x64 in mode RGB"),
    (ReturnsATensor, "returned a tensor of shape [1, 64, 16], float32, on cpu; expected None or {'latents': a tensor "
                     "of shape [1, 64, 16], float32, on cpu}"),
    (ReturnsAnotherKey, "returned {'noise': a tensor of shape [1, 64, 16], float32, on cpu}; expected None or "
                        "{'latents'"),
    (ReturnsDoubleLatents, "returned {'latents': a tensor of shape [1, 64, 16], float64, on cpu}; expected None or "
                           "{'latents': a tensor of shape [1, 64, 16], float32, on cpu}"),
    (ReturnsAnImageFromPreprocess, "returned an object of type Image; this hook returns None (edit the job in place"),
])
def test_a_plugin_returning_the_wrong_thing_fails_the_job_naming_it_and_what_was_expected(runner, plugin, expected):
    with pytest.raises(PluginError) as caught:
        runner.run(manager=manager_with(("wrong", plugin())), output_type="jpeg")
    assert caught.value.plugin == "wrong" and expected in caught.value.message, caught.value.message


def test_each_step_end_plugin_sees_the_latents_the_one_before_left(runner):
    seen = []

    class Zeroing:
        @hookimpl
        def inpaint_step_end(self, latents):
            return {"latents": torch.zeros_like(latents)}

    class Observer:
        @hookimpl
        def inpaint_step_end(self, latents):
            seen.append(float(latents.abs().max()))

    runner.run(manager=manager_with(("zeroing", Zeroing()), ("observer", Observer())), plugins={"paste_back": False})
    assert seen and all(value == 0 for value in seen)


@pytest.mark.parametrize("grow", ["a lot", True, "2"])  # built-in options take JSON types as the request does
def test_a_bad_plugin_option_names_the_option_in_the_field(runner, grow):
    with pytest.raises(InvalidRequest) as caught:
        runner.run(plugins={"mask": {"grow": grow}})
    assert caught.value.field == "plugins.mask.grow"


def test_an_installed_plugin_named_like_a_builtin_is_refused_and_listed_apart(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "mask", "shadow_mask", "from worker.hooks import hookimpl\n", version="9.9")
    rows = {row["name"]: row for row in Plugins().describe()}
    assert rows["mask"]["status"] == "active" and rows["mask"]["kind"] == "built-in"
    assert rows["mask (from shadow-mask)"]["status"] == "failed"
    assert "already registered" in rows["mask (from shadow-mask)"]["error"]


def test_registering_under_a_taken_name_is_refused_and_the_listed_plugin_is_untouched():
    first, second = Recorder(), Recorder()
    manager = manager_with(("recorder", first), ("off", Recorder()), blocked=["off"])
    for name in ("recorder", "mask", "off"):  # registered, built-in, blocked
        with pytest.raises(ValueError, match=f"a plugin named '{name}' is already listed"):
            manager.register(second, name)
    rows = {row["name"]: row["status"] for row in manager.describe()}
    assert rows["recorder"] == "active" and rows["mask"] == "active" and rows["off"] == "blocked"
    assert manager.pm.get_plugin("recorder") is first and not manager.report.failed


def test_a_plugin_that_calls_sys_exit_fails_its_job_and_the_next_job_runs(runner, caplog):
    class Exits:
        @hookimpl
        def inpaint_step_end(self, step):
            sys.exit("the plugin gave up")

    class ExitsWhenTold:
        @hookimpl
        def inpaint_job_finished(self):
            sys.exit(3)

    manager = manager_with(("exits", Exits()), ("exits_when_told", ExitsWhenTold()))
    with pytest.raises(PluginError) as caught:
        runner.run(manager=manager)
    assert caught.value.plugin == "exits" and "raised in inpaint_step_end: SystemExit: the plugin gave up" in \
        caught.value.message
    assert runner.run(manager=manager, plugins={"exits": False}).images  # a finished hook's exit is only logged
    assert "'exits_when_told' raised in inpaint_job_finished" in caplog.text


def test_a_plugin_that_calls_sys_exit_at_import_is_skipped_and_listed_as_failed(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "exiting", "exiting_plugin", "import sys; sys.exit('EXITING_URL must be set')")
    manager = Plugins()
    assert manager.report.failed["exiting"] == "SystemExit: EXITING_URL must be set"
    assert "paste_back" in manager.names and "exiting" not in manager.names


def test_each_group_runs_in_registration_order_trylast_included(runner):
    ran = []

    def plugin(name, **marks):
        class Named:
            @hookimpl(**marks)
            def inpaint_preprocess(self):
                ran.append(name)
        return name, Named()

    runner.run(manager=manager_with(plugin("a_last", trylast=True), plugin("b_last", trylast=True), plugin("c"),
                                    plugin("d"), plugin("e_first", tryfirst=True), plugin("f_first", tryfirst=True)))
    assert ran == ["e_first", "f_first", "c", "d", "a_last", "b_last"]


def test_a_plugins_bad_operator_setting_fails_jobs_naming_it_without_its_value(runner, monkeypatch):
    from pydantic import BaseModel, ConfigDict, Field

    monkeypatch.setenv("CRM_API_KEY", "sk_live_SUPERSECRET_123")

    class Crm:
        class Options(BaseModel):
            model_config = ConfigDict(validate_default=True)
            api_key: str = Field(default_factory=lambda: os.environ["CRM_API_KEY"], pattern=r"^key-")

        @hookimpl
        def inpaint_job_finished(self):
            pass

    with pytest.raises(PluginError) as caught:
        runner.run(manager=manager_with(("crm", Crm())))
    assert caught.value.plugin == "crm" and "api_key: String should match pattern" in caught.value.message
    assert "SUPERSECRET" not in caught.value.message


def test_urls_in_a_plugins_error_are_shown_without_their_query(runner):
    class Fetches:
        @hookimpl
        def inpaint_preprocess(self):
            raise RuntimeError("GET https://user:pw@cdn.example/logo.png?X-Amz-Signature=SECRET-SIG failed: 403")

    with pytest.raises(PluginError) as caught:
        runner.run(manager=manager_with(("fetches", Fetches())))
    assert "GET https://cdn.example/logo.png?... failed: 403" in caught.value.message
    assert "SECRET-SIG" not in caught.value.message and "pw@" not in caught.value.message


class Reschedule:
    def __init__(self, **params):
        self.params = params

    @hookimpl
    def inpaint_preprocess(self, job):
        job.params.update(self.params)


def test_a_preprocess_plugin_can_change_the_schedule_and_steps_follow_it(runner):
    recorder = Recorder()
    result = runner.run(manager=manager_with(("reschedule", Reschedule(num_inference_steps=6, strength=1.0)),
                                             ("recorder", recorder)), num_inference_steps=4, strength=0.6)
    assert [call[1:] for call in recorder.calls if call[0] == "step"] == [(step, 6) for step in range(1, 7)]
    parameters = result.parameters
    assert (parameters.num_inference_steps, parameters.strength, parameters.steps_run) == (6, 1.0, 6)


def test_a_schedule_a_preprocess_plugin_gives_as_numpy_values_is_taken(runner):
    recorder = Recorder()
    result = runner.run(manager=manager_with(("reschedule", Reschedule(num_inference_steps=np.int64(5),
                                                                       sigmas=np.linspace(1.0, 0.2, 5))),
                                             ("recorder", recorder)), num_inference_steps=4, strength=1.0)
    assert [call[1:] for call in recorder.calls if call[0] == "step"] == [(step, 5) for step in range(1, 6)]
    assert result.parameters.num_inference_steps == 5


@pytest.mark.parametrize(("params", "field", "expected"), [
    ({"strength": 0.0}, "strength", "must be a number in (0, 1], got 0.0"),
    ({"num_inference_steps": 5000}, "num_inference_steps", "must be an integer from 1 to 1000, got 5000"),
    ({"num_inference_steps": 4.0}, "num_inference_steps", "must be an integer"),
    ({"num_inference_steps": 300}, "num_inference_steps", "over this worker's cap of 200"),
    ({"sigmas": [1.0, 0.5]}, "sigmas", "has 2 values but num_inference_steps is 4"),
])
def test_a_schedule_a_preprocess_plugin_breaks_is_refused_before_the_pipeline(runner, params, field, expected):
    with pytest.raises(InvalidRequest) as caught:
        runner.run(manager=manager_with(("reschedule", Reschedule(**params))), num_inference_steps=4)
    assert caught.value.field == field and expected in caught.value.message
    assert "after a preprocess hook changed" in caught.value.message
