"""`inpaint-worker` as a user runs it: a real process, files on disk, JSON on stdout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import box_mask, photo


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.slow
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


@pytest.mark.slow
def test_run_reports_bad_input_as_json_and_exit_code_2(tiny_model_dir, tmp_path):
    photo().save(tmp_path / "image.png")
    done = cli("run", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "missing.png"),
               "--prompt", "x", "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
               "--set", "strength=1.5")
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "invalid_request" and error["field"] == "strength"


@pytest.mark.slow
def test_run_exits_1_for_a_job_that_fails_on_a_valid_request(tiny_model_dir, tmp_path):
    photo().save(tmp_path / "image.png")
    done = cli("run", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "missing.png"),
               "--prompt", "x", "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir))
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "input_not_found" and error["field"] == "mask_image"


@pytest.mark.slow
def test_run_refuses_a_request_file_that_is_not_a_json_object(tiny_model_dir, tmp_path):
    (tmp_path / "list.json").write_text('["a red barn"]')
    done = cli("run", "--request", str(tmp_path / "list.json"), "--prompt", "x", "--out", str(tmp_path / "out"),
               "--model", str(tiny_model_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "--request" and "JSON list" in error["message"]


@pytest.mark.slow
@pytest.mark.parametrize(("text", "words"), [
    ('{"prompt": "a red barn", "prompt": "a blue barn"}', "'prompt' twice"),  # json alone takes the last silently
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),  # was a traceback from the reader
])
def test_run_refuses_a_request_file_with_a_key_twice_or_nested_past_reading(tiny_model_dir, tmp_path, text, words):
    (tmp_path / "job.json").write_text(text)
    done = cli("run", "--request", str(tmp_path / "job.json"), "--out", str(tmp_path / "out"),
               "--model", str(tiny_model_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "--request" and words in error["message"], error


@pytest.mark.slow
def test_run_refuses_a_device_as_an_image_without_reading_it(tiny_model_dir, tmp_path):
    box_mask().save(tmp_path / "mask.png")
    done = cli("run", "--image", "/dev/zero", "--mask", str(tmp_path / "mask.png"), "--prompt", "x",
               "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir))  # was read until MemoryError
    assert done.returncode == 2, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "image" and "not a regular file" in error["message"]


@pytest.mark.slow
def test_plugins_lists_the_builtins_and_their_hooks():
    done = cli("plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["paste_back"]["hooks"] == ["inpaint_postprocess"]
    assert rows["progress"]["hooks"] == ["inpaint_step_end"]


@pytest.mark.slow
def test_plugins_shows_a_blocked_plugin(monkeypatch):
    import os

    done = cli("plugins", "--json", env={**os.environ, "INPAINT_PLUGINS_BLOCKED": "paste_back"})
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["paste_back"]["status"] == "blocked"


@pytest.mark.slow
def test_tiny_model_writes_a_loadable_labelled_pipeline(tmp_path):
    done = cli("tiny-model", str(tmp_path / "tiny"))
    assert done.returncode == 0, done.stderr
    assert "random-weight" in done.stdout
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageInpaintPipeline"
    assert (tmp_path / "tiny" / "TINY_RANDOM_WEIGHTS.json").is_file()


@pytest.mark.slow
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


# --- submit and up, as a shell user meets them -------------------------------------------------------------------

def submit_env(stack, **extra: str) -> dict:
    return {**os.environ, **stack.env(), **extra}


@pytest.mark.slow
def test_submit_sends_a_request_file_with_data_urls_as_they_are(stack, worker, tmp_path):
    from tests.support import data_url

    request = {"prompt": "a pear", "image": data_url(photo(seed=5)), "mask_image": data_url(box_mask()),
               "num_inference_steps": 2, "seed": 3}
    (tmp_path / "job.json").write_text(json.dumps(request))
    done = cli("submit", "--request", str(tmp_path / "job.json"), "--quiet", "--timeout", "120",
               env=submit_env(stack))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "SUCCESS"
    assert "Traceback" not in done.stderr and "base64" not in done.stderr


@pytest.mark.slow
def test_submit_refuses_a_local_file_that_does_not_exist_before_sending(stack, client, tmp_path):
    from worker.protocol import submitted_key

    box_mask().save(tmp_path / "mask.png")
    job_id = f"typo-{time.monotonic_ns()}"
    done = cli("submit", "--image", str(tmp_path / "phtoo.png"), "--mask", str(tmp_path / "mask.png"),
               "--prompt", "x", "--job-id", job_id, env=submit_env(stack))
    assert done.returncode == 2, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "image" and "no file at" in error["message"] and "phtoo.png" in error["message"]
    assert not client.redis.exists(submitted_key(job_id))  # nothing was enqueued
    assert client.status(job_id).state == "PENDING"


@pytest.mark.slow
def test_submit_refuses_a_local_tensor_file_that_does_not_exist_before_sending(stack, client, tmp_path):
    from worker.protocol import submitted_key

    photo().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    job_id = f"latents-{time.monotonic_ns()}"
    done = cli("submit", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
               "--prompt", "x", "--job-id", job_id, "--set", f"latents={tmp_path / 'noise.safetensors'}",
               env=submit_env(stack))
    assert done.returncode == 2, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "latents" and "no file at" in error["message"]
    assert not client.redis.exists(submitted_key(job_id))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "words"), [("device", "not a regular file"), ("fifo", "not a regular file"),
                                             ("nul", "NUL character"), ("big", "over the 1000-byte cap")])
def test_submit_reads_a_local_file_as_run_does_and_sends_nothing_it_refuses(tmp_path, kind, words):
    """`submit` inlines local files with `run`'s checks: /dev/zero read until memory ran out, a FIFO blocked, a NUL
    byte was a traceback. Each is refused before Redis is asked (it is not there: port 1)."""
    box_mask().save(tmp_path / "mask.png")
    photo().save(tmp_path / "photo.png")
    os.mkfifo(tmp_path / "pipe.png")
    image = {"device": "/dev/zero", "fifo": str(tmp_path / "pipe.png"), "nul": "photo\0.png",
             "big": str(tmp_path / "photo.png")}[kind]
    (tmp_path / "job.json").write_text(json.dumps({"prompt": "x", "image": image,  # a NUL cannot be an argument
                                                   "mask_image": str(tmp_path / "mask.png")}))
    env = {**os.environ, "INPAINT_BROKER_URL": "redis://127.0.0.1:1/0", "INPAINT_DATA_URL_MAX_BYTES": "1000"}
    done = cli("submit", "--request", str(tmp_path / "job.json"), env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["field"] == "image" and words in error["message"], error


@pytest.mark.slow
def test_submit_exits_2_when_the_worker_refuses_the_request(stack, worker, tmp_path):
    photo().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    done = cli("submit", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
               "--prompt", "x", "--set", "height=100", "--quiet", "--timeout", "120", env=submit_env(stack))
    assert done.returncode == 2, (done.returncode, done.stderr)  # as `run` exits for the same request
    status = json.loads(done.stdout)
    assert status["state"] == "FAILURE" and status["error"]["code"] == "invalid_request"
    assert status["error"]["field"] == "height"


@pytest.mark.slow
def test_submit_timeout_says_the_job_goes_on_and_exits_3(stack, client, worker, tmp_path):
    photo().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    job_id = f"slow-{time.monotonic_ns()}"
    done = cli("submit", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
               "--prompt", "x", "--job-id", job_id, "--timeout", "1", "--quiet",
               "--set", "num_inference_steps=40", "--set", "strength=1.0",
               "--set", 'plugins={"testkit": {"step_s": 0.15}}', env=submit_env(stack))
    try:
        assert done.returncode == 3, (done.returncode, done.stderr)
        assert re.search(r"timed out after 1 s; the job goes on \(state (PENDING|STARTED|PROGRESS)", done.stderr), \
            done.stderr
        assert not client.status(job_id).done
    finally:
        client.cancel(job_id)
        client.wait(job_id, timeout=60)
    assert re.search(r"exit\s+3", cli("submit", "--help").stdout)


def test_submit_with_redis_down_is_one_line_without_the_password():
    from worker.stack import free_port

    port = free_port()
    started = time.monotonic()
    done = cli("submit", "--image", "s3://inputs/a.png", "--mask", "s3://inputs/b.png", "--prompt", "x",
               env={**os.environ, "INPAINT_BROKER_URL": f"redis://:pw-Zq9@127.0.0.1:{port}/0"})
    assert time.monotonic() - started < 30  # the interpreter's start included; it hung for minutes
    assert done.returncode == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "pw-Zq9" not in done.stderr


def test_a_bad_setting_is_one_line_naming_the_variable_never_its_value():
    for command in (["plugins"], ["submit", "--image", "s3://i/a.png", "--mask", "s3://i/b.png", "--prompt", "x"]):
        done = cli(*command, env={**os.environ, "INPAINT_MAX_STEPS": "secret-Zq9"})
        assert done.returncode == 2, done.stderr
        assert "INPAINT_MAX_STEPS" in done.stderr and "integer" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "Zq9" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_run_with_a_model_that_does_not_exist_is_one_line(tmp_path):
    photo().save(tmp_path / "image.png")
    box_mask().save(tmp_path / "mask.png")
    done = cli("run", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "x",
               "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"{tmp_path / 'no-such-model'} does not exist" in done.stderr, done.stderr


def test_up_demo_with_a_missing_input_stops_before_starting_anything(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "worker.cli", "up", "--demo", "--image", "photo.png"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # outside the checkout
    assert done.returncode == 2, done.stderr
    assert "--image photo.png: no such file" in done.stderr
    assert "redis" not in done.stderr and time.monotonic() - started < 30  # no stack was started


def test_a_number_too_long_for_python_to_read_is_refused_naming_where_it_came_from():
    from worker.cli import read_json
    from worker.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:  # was a ValueError traceback from the JSON reader
        read_json('{"seed": ' + "1" * 5000 + "}", "--request")
    assert caught.value.field == "--request" and "cannot be read" in caught.value.message
