"""Getting a backend's local images into a request: `InpaintClient.upload` (S3) and `worker.client.data_url`."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support import box_mask, photo
from worker.client import InpaintClient, data_url
from worker.errors import StorageError
from worker.inputs import read_data_url
from worker.schema import WorkerInfo
from worker.stack import TEST_CREDENTIALS

ROOT = Path(__file__).resolve().parent.parent


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uploader(stack):
    # a backend's S3 credentials come from the standard AWS_* variables, as the workers' do
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TEST_CREDENTIALS.items():
            patch.setenv(name, value)
        yield InpaintClient.from_settings(stack.settings())


def stored(stack, ref: str) -> tuple[bytes, str]:
    bucket, key = ref.removeprefix("s3://").split("/", 1)
    found = stack.s3.client().get_object(Bucket=bucket, Key=key)
    return found["Body"].read(), found["ContentType"]


@pytest.mark.slow
def test_a_local_file_uploaded_and_inlined_runs_as_a_job(stack, uploader, worker, tmp_path):
    (tmp_path / "house.png").write_bytes(png(photo(seed=3)))
    (tmp_path / "house-mask.png").write_bytes(png(box_mask()))
    image = uploader.upload(tmp_path / "house.png")
    mask = data_url(str(tmp_path / "house-mask.png"))
    job_id = uploader.submit({"prompt": "a red barn", "image": image, "mask_image": mask, "seed": 7,
                              "num_inference_steps": 2})
    status = uploader.wait(job_id, timeout=120)
    assert status.state == "SUCCESS", status.error
    assert status.result.images[0].width == 64
    # who ran it, as a model like the images: what the worker writes
    ran = status.result.worker
    assert isinstance(ran, WorkerInfo) and ran.node == worker.node and ran.device == "cpu"
    assert set(ran.versions) == {"worker", "diffusers", "torch"} and ran.queue_wait_s >= 0
    assert ran["node"] == worker.node  # as when it was a dict


@pytest.mark.slow
def test_upload_puts_the_bytes_in_the_first_input_bucket_under_their_hash(stack, uploader, tmp_path):
    data = png(photo(seed=4))
    (tmp_path / "Photo.PNG").write_bytes(data)
    ref = uploader.upload(str(tmp_path / "Photo.PNG"))
    assert ref.startswith("s3://inputs/uploads/") and ref.endswith(".png")
    assert stored(stack, ref) == (data, "image/png")
    assert uploader.upload(data) == ref  # the same bytes are one object, whatever their name
    assert uploader.upload(data, key="mine/house.png") == "s3://inputs/mine/house.png"
    assert stored(stack, "s3://inputs/mine/house.png")[0] == data


@pytest.mark.slow
def test_upload_of_bytes_names_them_by_the_image_they_are(stack, uploader):
    ref = uploader.upload(jpeg(photo(seed=5)))
    assert ref.endswith(".jpg") and stored(stack, ref)[1] == "image/jpeg"
    ref = uploader.upload(b"not an image, maybe a tensor")
    assert stored(stack, ref)[1] == "application/octet-stream"


@pytest.mark.slow
def test_upload_refuses_what_it_cannot_send_with_a_message_to_act_on(stack, uploader, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        uploader.upload(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        uploader.upload(tmp_path)
    with pytest.raises(ValueError, match="is empty"):
        uploader.upload(b"")
    with pytest.raises(TypeError, match="a path or bytes"):
        uploader.upload(photo())  # a PIL image: save it first
    with pytest.raises(ValueError, match="set INPAINT_INPUT_BUCKETS"):
        InpaintClient.from_settings(stack.settings(input_buckets=[])).upload(b"x")
    with pytest.raises(ValueError, match=r"3 bytes, over INPAINT_INPUT_MAX_BYTES \(2\)"):
        InpaintClient.from_settings(stack.settings(input_max_bytes=2)).upload(b"abc")
    with pytest.raises(ValueError, match="from_env"):
        InpaintClient(uploader.app).upload(b"x")
    with pytest.raises(StorageError, match="s3://no-such-bucket/.*NoSuchBucket"):
        InpaintClient.from_settings(stack.settings(input_buckets=["no-such-bucket"])).upload(b"x")


@pytest.mark.slow
def test_upload_without_s3_credentials_says_which_variables_to_set_at_once(stack, tmp_path):
    # a fresh process: boto3 keeps the credentials it found for the life of one
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({k: v for k, v in stack.env().items() if not k.startswith("AWS_")}, AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    code = ("import time; from worker.client import InpaintClient; from worker.errors import StorageError\n"
            "started = time.monotonic()\n"
            "try:\n    InpaintClient.from_env().upload(b'x')\n"
            "except StorageError as error:\n    print(error, time.monotonic() - started)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in done.stdout, done.stderr
    assert float(done.stdout.split()[-1]) < 5  # not retried: no try would find them


def test_data_url_inlines_a_file_or_bytes_as_the_worker_reads_it(tmp_path):
    data = png(photo())
    (tmp_path / "a.png").write_bytes(data)
    url = data_url(tmp_path / "a.png")
    assert url.startswith("data:image/png;base64,") and read_data_url(url, "image", 10**6) == data
    assert data_url(data) == url  # the type from the image's header
    assert data_url(jpeg(photo())).startswith("data:image/jpeg;base64,")
    assert data_url(b"\x00\x01", content_type="application/octet-stream") == \
        "data:application/octet-stream;base64," + base64.b64encode(b"\x00\x01").decode()
    with pytest.raises(FileNotFoundError, match="nope.png: no such file"):
        data_url(tmp_path / "nope.png")


@pytest.mark.slow
def test_the_helpers_import_no_torch(stack):
    code = ("import sys; from worker.client import InpaintClient, data_url; "
            "data_url(b'\\x89PNG\\r\\n'); InpaintClient.from_env().upload(b'light'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **stack.env()},  # AWS_* too
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_worker_info_parses_older_and_newer_workers_and_dumps_what_was_written():
    older = WorkerInfo.model_validate({"node": "gpu0@a"})  # no device, versions or queue wait
    assert (older.node, older.device, older.queue_wait_s, older.versions) == ("gpu0@a", None, None, {})
    assert older.model_dump(mode="json") == {"node": "gpu0@a"}  # result.json and the task state keep their keys
    assert older.get("queue_wait_s", 0.0) == 0.0 and older.get("node") == "gpu0@a"
    with pytest.raises(KeyError):
        older["queue_wait_s"]
    newer = WorkerInfo.model_validate({"node": "gpu1@b", "device": "cuda", "pool": "threads"})
    assert newer.model_extra == {"pool": "threads"} and newer["pool"] == "threads"
    assert WorkerInfo.model_validate(newer.model_dump(mode="json")) == newer
    assert WorkerInfo().model_dump() == {}  # results of workers that wrote no worker field
