"""Built-in plugins as a user sees them: paste-back on thin masks, auto-crop within the pixel budget, what a
cancelled or late job says, and the order hooks really run in."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.support import box_mask, data_url, photo
from worker.builtin import paste_back
from worker.errors import Cancelled, DeadlineExceeded
from worker.hooks import hookimpl
from worker.plugins import Plugins

NO_PASTE = {"paste_back": False}


def run_job(runner, settings, sink_dir, **kwargs):
    """One job with these settings, writing to `sink_dir` rather than a folder of the runner's."""
    from worker.outputs import DirectorySink

    return runner.run(settings=settings, sink=DirectorySink(sink_dir), **kwargs)


# --- paste_back ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "box", "centre"), [
    ("6x49 stripe", (29, 8, 35, 57), (slice(10, 55), slice(31, 33))),
    ("8x8 square", (28, 28, 36, 36), (slice(31, 33), slice(31, 33))),
])
def test_paste_back_keeps_the_generated_pixels_of_a_thin_mask(runner, name, box, centre):
    source, mask = photo(), box_mask(box=box)
    pasted = runner.pixels(runner.run(image=data_url(source), mask_image=data_url(mask)))
    generated = runner.pixels(runner.run(plugins=NO_PASTE, image=data_url(source), mask_image=data_url(mask)))
    original = np.asarray(source).astype(int)
    inside = np.asarray(mask) > 0
    assert np.array_equal(pasted[~inside], original[~inside]), f"{name}: a pixel outside the mask changed"
    changed = (pasted != original).any(axis=-1)[inside]
    assert changed.mean() > 0.9, f"{name}: only {changed.sum()} of {inside.sum()} mask pixels got generated content"
    assert np.array_equal(pasted[centre], generated[centre]), f"{name}: the mask's centre is not the generated image"


@pytest.mark.parametrize("width", [1, 2, 3, 5, 6, 8, 9, 12])
def test_the_soft_edge_never_removes_the_inside_of_a_mask(width):
    for shape in ((width, 49), (width, width)):  # a stripe and a square
        inside = np.zeros((64, 64), dtype=bool)
        inside[8:8 + shape[1], 20:20 + shape[0]] = True
        weights = np.asarray(paste_back.blend_mask(Image.fromarray(inside.astype(np.uint8) * 255), 4))
        assert weights[~inside].max() == 0  # outside: the input exactly
        assert weights[inside].min() > 0  # every masked pixel gets some generated content
        assert weights.max() == 255  # and the centre all of it


def test_a_wide_mask_keeps_a_soft_edge_of_feather_pixels():
    mask = box_mask(box=(8, 8, 56, 56))
    row = np.asarray(paste_back.blend_mask(mask, 4))[32]
    assert list(row[6:14]) == [0, 0, 64, 128, 191, 255, 255, 255]
    assert paste_back.blend_mask(mask, 0).getpixel((8, 32)) == 255  # feather 0: a hard edge
    full = Image.new("L", (16, 16), 255)
    assert paste_back.blend_mask(full, 4).getextrema() == (255, 255)  # the image's border is no edge of the mask


def test_paste_back_outside_pixels_are_the_input_resized_when_the_output_size_differs(runner):
    source, mask = photo(101, 70), box_mask(101, 70, (40, 20, 70, 50))  # 101x70 is off the factor: 96x64 out
    result = runner.run(image=data_url(source), mask_image=data_url(mask))
    assert (result.images[0].width, result.images[0].height) == (96, 64)
    resized = np.asarray(source.resize((96, 64), Image.Resampling.LANCZOS)).astype(int)
    outside = np.asarray(mask.resize((96, 64), Image.Resampling.NEAREST)) == 0
    assert np.array_equal(runner.pixels(result)[outside], resized[outside])  # the README's promise, as it reads


# --- auto_crop -------------------------------------------------------------------------------------------------


def test_INPAINT_AUTO_CROP_turns_auto_crop_on_for_every_job_and_a_request_can_turn_it_off(runner, settings,
                                                                                          tmp_path):
    fields = dict(image=data_url(photo(256, 256)), mask_image=data_url(box_mask(256, 256, (100, 100, 124, 124))))
    on = settings.model_copy(update={"auto_crop": True})  # what INPAINT_AUTO_CROP=1 gives the worker
    assert run_job(runner, on, tmp_path / "on", **fields).parameters.padding_mask_crop == 32
    off = run_job(runner, on, tmp_path / "off", plugins={"auto_crop": {"enabled": False}}, **fields)
    assert off.parameters.padding_mask_crop is None
    assert run_job(runner, settings, tmp_path / "default", **fields).parameters.padding_mask_crop is None


def test_auto_crop_scales_a_region_over_the_pixel_budget_down_instead_of_failing(runner, settings, tmp_path):
    small = settings.model_copy(update={"max_pixels": 64 * 64})
    source, mask = photo(256, 256), box_mask(256, 256, (100, 100, 124, 124))  # region 88x88 > 64x64 budget
    fields = dict(image=data_url(source), mask_image=data_url(mask))
    plain = run_job(runner, small, tmp_path / "plain", **fields)
    assert (plain.parameters.width, plain.parameters.height) == (64, 64)  # the job without auto_crop succeeds
    cropped = run_job(runner, small, tmp_path / "crop", plugins={"auto_crop": {"enabled": True}, **NO_PASTE},
                      **fields)
    parameters = cropped.parameters
    assert parameters.padding_mask_crop == 32
    assert parameters.processing_width * parameters.processing_height <= 64 * 64
    assert (cropped.images[0].width, cropped.images[0].height) == (parameters.width, parameters.height) == (256, 256)
    out = np.asarray(Image.open(cropped.images[0].location).convert("RGB")).astype(int)
    original = np.asarray(source).astype(int)
    assert np.array_equal(out[:60], original[:60]) and np.array_equal(out[:, 170:], original[:, 170:])
    assert not np.array_equal(out[100:124, 100:124], original[100:124, 100:124])


# --- cancel and deadline ---------------------------------------------------------------------------------------


def test_a_cancelled_job_says_no_result_was_written_and_its_previews_stay(runner, settings, tmp_path):
    with pytest.raises(Cancelled) as caught:
        run_job(runner, settings, tmp_path, cancel_requested=lambda: (tmp_path / "previews").exists(),
                preview_every=1, num_inference_steps=6, strength=1.0)
    assert caught.value.message == "cancelled at step 2 of 6; no result was written"
    assert [p.name for p in (tmp_path / "previews").iterdir()] == ["0-0001.jpg"]  # true: a preview was written
    assert not (tmp_path / "result.json").exists() and not list(tmp_path.glob("0.*"))


def test_a_job_of_several_images_cancelled_says_which_image(runner, settings, tmp_path):
    with pytest.raises(Cancelled) as caught:  # the previews of image 2 appear once image 1 is done
        run_job(runner, settings, tmp_path, cancel_requested=lambda: any((tmp_path / "previews").glob("1-*")),
                preview_every=1, num_inference_steps=3, strength=1.0, num_images_per_prompt=2)
    assert caught.value.message == "cancelled at step 2 of 3 of image 2 of 2; no result was written"


def test_a_job_past_its_deadline_says_no_result_was_written(runner, settings, tmp_path):
    with pytest.raises(DeadlineExceeded) as caught:
        run_job(runner, settings, tmp_path, deadline_s=0.000001)
    assert "nothing was written" not in caught.value.message
    assert caught.value.message.endswith("during denoising; no result was written")
    assert not (tmp_path / "result.json").exists()


def test_a_cancel_that_comes_during_decoding_still_writes_nothing(runner, settings, tmp_path):
    stages = []  # the cancel is asked for once the last step is done, as the image decodes
    with pytest.raises(Cancelled) as caught:
        run_job(runner, settings, tmp_path, reporter=lambda progress: stages.append(progress.stage),
                cancel_requested=lambda: "decoding" in stages, num_inference_steps=3, strength=1.0)
    assert caught.value.message == "cancelled after denoising; no result was written"
    assert not list(tmp_path.iterdir())


def test_a_job_past_its_deadline_and_margin_after_denoising_writes_nothing(runner, settings, tmp_path):
    class SlowLastStep:  # the last step ends past the deadline and its margin: decoding and uploads have no time left
        @hookimpl
        def inpaint_step_end(self, step, total_steps):
            if step == total_steps:
                time.sleep(0.6)

    manager = Plugins(load_entry_points=False)
    manager.register(SlowLastStep(), "slow_last_step")
    with pytest.raises(DeadlineExceeded) as caught:
        run_job(runner, settings.model_copy(update={"deadline_margin_s": 0.1}), tmp_path, manager=manager,
                num_inference_steps=2, strength=1.0, deadline_s=0.3)
    assert "and the margin after it (INPAINT_DEADLINE_MARGIN_S) before its outputs were written" in caught.value.message
    assert not list(tmp_path.iterdir())


def test_an_image_is_turned_as_its_exif_orientation_says(runner):
    import base64
    import io

    source = photo(64, 32)  # stored 64 wide; orientation 6: shown turned a quarter clockwise, 32 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", exif=exif.tobytes())
    image = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    result = runner.run(image=image, mask_image=data_url(box_mask(32, 64, (8, 8, 24, 24))))
    assert (result.images[0].width, result.images[0].height) == (32, 64)


# --- the order hooks run in (docs/plugins.md, "Rules of the road") ---------------------------------------------


class Installed:
    """An installed plugin, registered after the built-ins, that asks to run first."""

    def __init__(self):
        self.images, self.finished = [], []

    @hookimpl(tryfirst=True)
    def inpaint_postprocess(self, images):
        self.images.append(np.asarray(images[0]).astype(int))

    @hookimpl(tryfirst=True)
    def inpaint_step_end(self, step):
        pass

    @hookimpl
    def inpaint_job_finished(self, result, job=None):  # an argument with a default is never passed
        self.finished.append(job)


def test_an_installed_tryfirst_plugin_runs_after_the_builtin_tryfirst_ones(runner):
    from worker.plugins import JobHooks

    installed = Installed()
    manager = Plugins(load_entry_points=False)
    manager.register(installed, "installed")
    source, mask = photo(), box_mask()
    run = runner.run(manager=manager, image=data_url(source), mask_image=data_url(mask))
    outside = np.asarray(mask) == 0
    # paste_back (built-in, tryfirst) ran before this tryfirst plugin: it already sees the pasted-back image
    assert np.array_equal(installed.images[0][outside], np.asarray(source).astype(int)[outside])
    assert np.array_equal(installed.images[0], runner.pixels(run))
    assert installed.finished == [None]
    order = [impl.plugin_name for impl in JobHooks(manager, [])._impls("inpaint_step_end")]
    # tryfirst ones in registration order (built-ins first), then the rest in registration order
    assert order == ["cancel", "deadline", "installed", "preview", "progress"]


# --- mask ------------------------------------------------------------------------------------------------------


def canvas_export(mode: str) -> Image.Image:
    """A white stroke on a transparent background, as a browser canvas or an editor exports a mask."""
    alpha = np.asarray(box_mask())
    if mode == "RGBA":
        return Image.fromarray(np.dstack([alpha, alpha, alpha, alpha]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([alpha, alpha]), "LA")
    palette = Image.fromarray((alpha > 0).astype(np.uint8), "P")  # index 0 transparent black, 1 white
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.info["transparency"] = 0
    return palette


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_mask_with_a_transparent_background_repaints_only_its_stroke(runner, mode):
    exported = canvas_export(mode)
    assert exported.mode == mode
    with_alpha = runner.run(plugins=NO_PASTE, mask_image=data_url(exported))
    plain = runner.run(plugins=NO_PASTE, mask_image=data_url(box_mask()))
    assert np.array_equal(runner.pixels(with_alpha), runner.pixels(plain))


@pytest.mark.parametrize("grow", [1, 2, 5, 17, 24])
def test_grow_dilates_the_mask_by_a_square_as_a_max_filter_would(grow):
    from PIL import ImageFilter

    from worker.builtin.mask import Options, prepare_mask

    rng = np.random.default_rng(grow)
    mask = Image.fromarray((rng.random((48, 80)) > 0.985).astype(np.uint8) * 255)  # scattered dots, edges included
    mask.putpixel((0, 0), 255)
    mask.putpixel((79, 47), 255)
    mask.paste(255, (0, 20, 1, 30))  # a stroke along the left edge, and a dot one pixel in from the top
    mask.putpixel((40, 1), 255)
    grown = prepare_mask(mask, mask.size, Options(grow=grow))
    expected = mask.filter(ImageFilter.MaxFilter(2 * grow + 1))  # what it was: a (2 grow + 1) square window
    assert grown.mode == "L" and np.array_equal(np.asarray(grown), np.asarray(expected))


@pytest.mark.parametrize(("pixels", "grow"), [
    ((slice(0, 1), [1, 23]), 24),  # one row: dots 1 px in from either end
    ((slice(100, 140), slice(0, 5)), 32),  # a stroke along the left edge of a 256x256 mask
])
def test_grow_leaves_no_gap_near_the_border(pixels, grow):
    from PIL import ImageFilter

    from worker.builtin.mask import Options, prepare_mask

    array = np.zeros((1, 26) if grow == 24 else (256, 256), np.uint8)
    array[pixels] = 255
    mask = Image.fromarray(array)
    grown = prepare_mask(mask, mask.size, Options(grow=grow))
    assert np.array_equal(np.asarray(grown), np.asarray(mask.filter(ImageFilter.MaxFilter(2 * grow + 1))))
