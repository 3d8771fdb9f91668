"""`inpaint-worker` as a user runs it: a real process, files on disk, JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from support import box_mask, photo


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_run_writes_images_and_result_identical_to_a_direct_pipeline_call(tiny_model_dir, tmp_path):
    from diffusers import QwenImageInpaintPipeline

    photo(96, 64).save(tmp_path / "image.png")
    box_mask(96, 64, (20, 16, 60, 48)).save(tmp_path / "mask.png")
    done = cli("run", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
               "--prompt", "a blue vase", "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
               "--set", "seed=9", "--set", "num_inference_steps=5", "--set", "negative_prompt=ugly",
               "--set", 'plugins={"paste_back": false}',
               env={**os.environ, "INPAINT_BATCH_CFG": "false"})  # batched CFG differs by float noise (1e-6)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["parameters"]["steps_run"] == 3 and result["parameters"]["true_cfg"] is True
    assert "3/3" in done.stderr  # the progress bar counts the steps that really run
    assert "random-weight" in done.stderr and "random-weight" in result["model"]["label"]
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert record["job_id"] == result["job_id"] and record["request"]["prompt"] == "a blue vase"

    pipe = QwenImageInpaintPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = pipe(prompt="a blue vase", negative_prompt="ugly", image=Image.open(tmp_path / "image.png"),
                    mask_image=Image.open(tmp_path / "mask.png"), height=64, width=96, num_inference_steps=5,
                    generator=torch.Generator().manual_seed(9)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "0.png")), np.asarray(expected))


def test_run_reports_bad_input_as_json_and_exit_code_2(tiny_model_dir, tmp_path):
    photo().save(tmp_path / "image.png")
    done = cli("run", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "missing.png"),
               "--prompt", "x", "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
               "--set", "strength=1.5")
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "invalid_request" and error["field"] == "strength"


def test_plugins_lists_the_builtins_and_their_hooks():
    done = cli("plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["paste_back"]["hooks"] == ["inpaint_postprocess"]
    assert rows["progress"]["hooks"] == ["inpaint_step_end"]


def test_plugins_shows_a_blocked_plugin(monkeypatch):
    import os

    done = cli("plugins", "--json", env={**os.environ, "INPAINT_PLUGINS_BLOCKED": "paste_back"})
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["paste_back"]["status"] == "blocked"


def test_tiny_model_writes_a_loadable_labelled_pipeline(tmp_path):
    done = cli("tiny-model", str(tmp_path / "tiny"))
    assert done.returncode == 0, done.stderr
    assert "random-weight" in done.stdout
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageInpaintPipeline"
    assert (tmp_path / "tiny" / "TINY_RANDOM_WEIGHTS.json").is_file()


def test_an_installed_plugin_is_found_by_entry_point_and_pipeline_loaded_runs_once(tiny_model_dir, tmp_path):
    import os
    import textwrap

    site = tmp_path / "site"
    info = site / "flip_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flip-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[inpaint_worker]\nflip = flip_plugin\n")
    (site / "flip_plugin.py").write_text(textwrap.dedent(f"""
        from PIL import ImageOps
        from worker.hooks import hookimpl

        @hookimpl
        def inpaint_pipeline_loaded(pipe, settings):
            with open({str(tmp_path / "loaded.txt")!r}, "a") as f:
                f.write(type(pipe).__name__ + "\\n")

        @hookimpl
        def inpaint_postprocess(images):
            return [ImageOps.mirror(image) for image in images]
    """))
    photo().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    outputs = {}
    for blocked in ("", "flip"):
        out = tmp_path / f"out-{blocked or 'all'}"
        done = cli("run", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                   "--prompt", "x", "--out", str(out), "--model", str(tiny_model_dir), "--set", "seed=1",
                   "--set", "num_inference_steps=2", "--quiet",
                   env={**env, "INPAINT_PLUGINS_BLOCKED": blocked})
        assert done.returncode == 0, done.stderr
        outputs[blocked] = np.asarray(Image.open(out / "0.png"))
        assert ("flip" in json.loads(done.stdout)["parameters"]["plugins"]) is (blocked == "")
    assert (tmp_path / "loaded.txt").read_text() == "InpaintPipeline\n"  # once: not in the blocked run
    assert np.array_equal(outputs[""], outputs["flip"][:, ::-1])
    listed = {row["name"]: row for row in json.loads(cli("plugins", "--json", env=env).stdout)}
    assert listed["flip"]["hooks"] == ["inpaint_pipeline_loaded", "inpaint_postprocess"]
