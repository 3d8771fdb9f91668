"""Upstream's exact behaviour on request: a request that asks for it gives what a direct `QwenImageInpaintPipeline`
call gives, pixel for pixel; the subclass shows upstream's signatures."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.support import data_url, photo
from worker.model import generator
from worker.pipeline import InpaintPipeline

NO_PASTE = {"paste_back": False}


def circle_mask(size: int = 64) -> Image.Image:
    """A disc whose edge crosses the latent grid's cells (4 px for the tiny model, 8 for Qwen-Image) anywhere."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((17, 13, 43, 39), fill=255)
    return mask


def test_mask_grid_upstream_gives_a_direct_calls_pixels_and_the_default_does_not(runner, direct_pipe):
    image, mask = photo(), circle_mask()
    expected = np.asarray(direct_pipe(prompt="a red apple on a table", image=image, mask_image=mask, height=64,
                                      width=64, num_inference_steps=4, generator=generator(5)).images[0]).astype(int)
    fields = {"plugins": NO_PASTE, "seed": 5, "image": data_url(image), "mask_image": data_url(mask)}
    upstream = runner.run(mask_grid="upstream", **fields)
    default = runner.run(**fields)
    assert upstream.parameters.mask_grid == "upstream" and default.parameters.mask_grid == "max_pool"
    assert np.array_equal(runner.pixels(upstream), expected)
    assert not np.array_equal(runner.pixels(default), expected)  # max-pooling repaints every cell the edge touches


def test_mask_grid_is_restored_after_a_job_and_refused_when_unknown(runner, model):
    from worker.errors import InvalidRequest

    runner.run(mask_grid="upstream")
    assert model.pipe.mask_grid == "max_pool"
    with pytest.raises(InvalidRequest) as caught:
        runner.run(mask_grid="nearest")
    assert caught.value.field == "mask_grid" and "max_pool" in caught.value.message


@pytest.mark.parametrize("name", ["__call__", "encode_prompt"])
def test_the_subclass_shows_upstreams_signatures(name):
    from diffusers import QwenImageInpaintPipeline

    ours, theirs = getattr(InpaintPipeline, name), getattr(QwenImageInpaintPipeline, name)
    assert inspect.signature(ours) == inspect.signature(theirs)
    assert "Upstream's documentation" in ours.__doc__


def test_a_bound_call_keeps_upstreams_parameters(model):
    parameters = inspect.signature(model.pipe.__call__).parameters
    assert list(parameters)[:3] == ["prompt", "negative_prompt", "true_cfg_scale"]
    assert parameters["strength"].default == 0.6 and "callback_on_step_end_tensor_inputs" in parameters


@pytest.mark.slow
def test_run_reads_a_request_files_relative_paths_from_the_files_folder(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    folder, elsewhere = tmp_path / "jobs", tmp_path / "elsewhere"
    (folder / "masks").mkdir(parents=True)
    elsewhere.mkdir()
    photo().save(folder / "photo.png")
    circle_mask().save(folder / "masks" / "mask.png")
    (folder / "job.json").write_text(json.dumps({"prompt": "a red apple", "image": "photo.png",
                                                 "mask_image": "masks/mask.png", "num_inference_steps": 2}))
    done = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--request", "../jobs/job.json", "--out", "out",
                           "--model", str(tiny_model_dir), "--quiet"], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["images"][0]["width"] == 64
    assert (elsewhere / "out" / "0.png").is_file()  # --out, a flag, is the current directory's


def readme_examples() -> list[dict]:
    """The JSON requests of the README's section on porting a direct call, in order."""
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Porting a direct `QwenImageInpaintPipeline` call", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


def tiny(request: dict) -> dict:
    """An example at the tiny model's scale: 2 steps, and 1024 px (a multiple of 16) as 64 (a multiple of 8)."""
    sized = {name: value // 16 for name, value in request.items() if name in ("height", "width")}
    return {**request, **sized, "num_inference_steps": 2}


@pytest.mark.parametrize(("index", "count", "size"), [
    (0, 1, (96, 64)),  # the input's size, rounded down to the tiny model's factor
    (1, 1, (100, 70)),  # padding_mask_crop: the crop is pasted back into the input
    (2, 6, (96, 64)),  # three prompts, two images each
])
def test_the_readme_examples_run_as_inpaint_worker_run_runs_them(tiny_model_dir, tmp_path, capsys, index, count,
                                                                 size):
    import json

    from tests.support import box_mask
    from worker import cli

    examples = readme_examples()
    assert len(examples) == 3 and all(e["image"] == "original.jpg" for e in examples)
    photo(100, 70).save(tmp_path / "original.jpg")
    box_mask(100, 70, (30, 20, 60, 50)).save(tmp_path / "mask.png")
    (tmp_path / "job.json").write_text(json.dumps(tiny(examples[index]), ensure_ascii=False))
    code = cli.main(["run", "--request", str(tmp_path / "job.json"), "--out", str(tmp_path / "out"),
                     "--model", str(tiny_model_dir), "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    assert [(image["width"], image["height"]) for image in result["images"]] == [size] * count
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"{k}.png" for k in range(count)]
    if count == 6:
        assert [image["prompt_index"] for image in result["images"]] == [0, 0, 1, 1, 2, 2]
