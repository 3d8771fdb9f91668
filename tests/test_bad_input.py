"""Bad input through a real worker: each case ends in its error code with a message naming the field,
and the worker goes on serving. Requests are sent with send_task, as a backend without our client would."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from tests.support import box_mask, photo, stored_pixels

pytestmark = pytest.mark.slow  # every case goes through a real worker

PNG = io.BytesIO()
photo().save(PNG, format="PNG")
PNG = PNG.getvalue()
JPEG = io.BytesIO()
photo().save(JPEG, format="JPEG")
JPEG = JPEG.getvalue()


def url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return url(buffer.getvalue())


def bomb() -> str:
    """A real PNG whose header claims 100000 x 100000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = PNG[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + PNG[33:]
    return url(patched)


def tensor(**tensors: torch.Tensor) -> str:
    return url(save(tensors), "application/octet-stream")


GOOD = {"prompt": "a quince", "image": url(PNG), "mask_image": png(box_mask()), "num_inference_steps": 2, "seed": 1}
ERRORS = {
    "corrupt-png": ({"image": url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)}, "invalid_request", "image"),
    "truncated-png": ({"image": url(PNG[: len(PNG) // 2])}, "invalid_request", "image"),
    "corrupt-jpeg": ({"image": url(b"\xff\xd8\xff\xe0" + b"\x00junk" * 40, "image/jpeg")}, "invalid_request", "image"),
    "truncated-jpeg": ({"image": url(JPEG[: len(JPEG) // 2], "image/jpeg")}, "invalid_request", "image"),
    "zero-size-image": ({"image": "data:image/png;base64,"}, "invalid_request", "image"),
    "decompression-bomb": ({"image": bomb()}, "invalid_request", "image"),
    "empty-mask": ({"mask_image": png(Image.new("L", (64, 64), 0))}, "invalid_request", "mask_image"),
    "wrong-type-strength": ({"strength": "strong"}, "invalid_request", "strength"),
    "wrong-type-prompt": ({"prompt": 42}, "invalid_request", "prompt"),
    "wrong-type-seed": ({"seed": "lucky"}, "invalid_request", "seed"),
    "unknown-field": ({"guidance": 3}, "invalid_request", "guidance"),
    "steps-zero": ({"num_inference_steps": 0}, "invalid_request", "num_inference_steps"),
    "steps-over-cap": ({"num_inference_steps": 500}, "invalid_request", "num_inference_steps"),
    "steps-too-large-for-a-float": ({"num_inference_steps": 10**400}, "invalid_request", "num_inference_steps"),
    "lora-scale-too-large-for-a-float": ({"attention_kwargs": {"scale": 10**400}}, "invalid_request",
                                         "attention_kwargs.scale"),
    "strength-zero": ({"strength": 0}, "invalid_request", "strength"),
    "strength-over-one": ({"strength": 1.5}, "invalid_request", "strength"),
    "sigmas-wrong-length": ({"sigmas": [1.0, 0.5, 0.1]}, "invalid_request", "sigmas"),
    "zero-images": ({"num_images_per_prompt": 0}, "invalid_request", "num_images_per_prompt"),
    "too-many-images": ({"num_images_per_prompt": 9}, "invalid_request", "num_images_per_prompt"),
    "prompt-over-max-sequence-length": ({"prompt": "pear " * 60, "max_sequence_length": 32}, "invalid_request",
                                        "prompt"),
    "max-sequence-length-over-1024": ({"max_sequence_length": 2048}, "invalid_request", "max_sequence_length"),
    "neither-prompt-nor-embeddings": ({"prompt": None}, "invalid_request", "prompt"),
    "latents-wrong-shape": ({"latents": tensor(latents=torch.zeros(1, 7, 16))}, "invalid_request", "latents"),
    "embeds-wrong-dtype": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.zeros(1, 5, 16,
                                                                                              dtype=torch.int32))},
                           "invalid_request", "prompt_embeds"),
    "unknown-plugin-option": ({"plugins": {"mask": {"blur": 3}}}, "invalid_request", "plugins.mask.blur"),
    "unknown-plugin": ({"plugins": {"sharpen": {}}}, "invalid_request", "plugins.sharpen"),
    "padding-mask-crop-zero": ({"padding_mask_crop": 0}, "invalid_request", "padding_mask_crop"),
    "height-off-the-factor": ({"height": 60, "width": 64}, "invalid_request", "height"),
    "s3-key-missing": ({"image": "s3://inputs/no/such/key.png"}, "input_not_found", "image"),
    "bucket-not-allowed": ({"image": "s3://private-bucket/a.png"}, "input_forbidden", "image"),
    "https-host-not-allowed": ({"image": "https://images.example.com/a.png"}, "input_forbidden", "image"),
    "https-name-resolving-to-loopback": ({"image": "https://localhost/a.png"}, "input_forbidden", "image"),
    "file-scheme": ({"image": "file:///etc/hostname"}, "input_forbidden", "image"),
    "ftp-scheme": ({"mask_image": "ftp://example.com/m.png"}, "input_forbidden", "mask_image"),
    "local-path": ({"image": "/etc/hostname"}, "input_forbidden", "image"),
    "data-url-over-cap": ({"image": url(b"\x00" * 1_100_000)}, "invalid_request", "image"),
    "output-bucket-not-allowed": ({"output": {"bucket": "someone-elses"}}, "invalid_request", "output.bucket"),
    "image-list": ({"image": [url(PNG)]}, "invalid_request", "image"),
    "job-id-not-the-task-id": ({"job_id": "order-1234"}, "invalid_request", "job_id"),
    "deadline-turned-off": ({"plugins": {"deadline": False}}, "invalid_request", "plugins.deadline"),
    "cancel-turned-off": ({"plugins": {"cancel": False}}, "invalid_request", "plugins.cancel"),
    "normalize-turned-off": ({"plugins": {"normalize": False}}, "invalid_request", "plugins.normalize"),
    "mask-turned-off": ({"plugins": {"mask": False}}, "invalid_request", "plugins.mask"),
    "latents-rows-for-images": ({"latents": tensor(latents=torch.zeros(2, 64, 16)), "num_images_per_prompt": 3},
                                "invalid_request", "latents"),
    "embeds-without-rows": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.zeros(0, 5, 16))},
                            "invalid_request", "prompt_embeds"),
    "embeds-without-tokens": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.zeros(1, 0, 16))},
                              "invalid_request", "prompt_embeds"),
    "embeds-over-max-sequence-length": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.zeros(1, 40, 16)),
                                         "max_sequence_length": 32}, "invalid_request", "prompt_embeds"),
    "negative-prompts-for-embeds-rows": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.zeros(2, 5, 16)),
                                          "negative_prompt": ["blurry"]}, "invalid_request", "negative_prompt"),
    "masked-image-latents-frames": ({"masked_image_latents": tensor(masked_image_latents=torch.zeros(1, 4, 3, 16, 16))},
                                    "invalid_request", "masked_image_latents"),
}


def with_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """A PNG with one more chunk after its header (CRC correct: only the chunk's content is bad)."""
    chunk = kind + payload
    return png[:33] + struct.pack(">I", len(payload)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# found by trying requests as a hostile or careless client would (issue 16); each once ended as internal, exhausted
# memory, or succeeded with noise
HOSTILE = {
    "prompt-cut-inside-an-emoji": ({"prompt": "a cat \ud83d"}, "invalid_request", "prompt"),
    "prompt-nested-500-levels": ({"prompt": nested(500)}, "invalid_request", "prompt"),
    "prompt-over-the-character-cap": ({"prompt": "pear " * 5000}, "invalid_request", "prompt"),
    "png-with-a-corrupt-exif-chunk": ({"image": url(with_chunk(PNG, b"eXIf", b"garbage!!"))}, "invalid_request",
                                      "image"),
    "true-cfg-scale-that-overflows": ({"true_cfg_scale": 1e308, "negative_prompt": "blurry"}, "invalid_request",
                                      "true_cfg_scale"),
    "latents-holding-nan": ({"latents": tensor(latents=torch.full((1, 64, 16), float("nan")))}, "invalid_request",
                            "latents"),
    "embeds-holding-infinity": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.full((1, 5, 16),
                                                                                               float("inf")))},
                                "invalid_request", "prompt_embeds"),
    "embeds-mask-not-zero-or-one": ({"prompt": None, "prompt_embeds": tensor(prompt_embeds=torch.zeros(1, 5, 16)),
                                     "prompt_embeds_mask": tensor(prompt_embeds_mask=torch.tensor([[1, 1, 2, 1, 0]]))},
                                    "invalid_request", "prompt_embeds_mask"),
    "latents-turning-nan-mid-run": ({"plugins": {"testkit": {"nan_at_step": 1}}}, "numerical_error", None),
    "https-nat64-form-of-a-private-address": ({"image": "https://[64:ff9b::a00:5]/a.png"}, "input_forbidden",
                                              "image"),
    "upper-case-data-url-over-cap": ({"image": "DATA:image/png;base64," + "A" * 1_400_000}, "invalid_request",
                                     "image"),
}
ERRORS.update(HOSTILE)
CONVERTED = {
    "rgba": png(photo().convert("RGBA")),
    "grayscale": png(photo().convert("L")),
    "palette": png(photo().convert("P")),
    "16-bit": png(Image.fromarray(np.asarray(photo().convert("L")).astype("uint16") * 257)),
    "cmyk-jpeg": None,
}
cmyk = io.BytesIO()
photo().convert("CMYK").save(cmyk, format="JPEG")
CONVERTED["cmyk-jpeg"] = url(cmyk.getvalue(), "image/jpeg")


def send(client, request: dict):
    job_id = f"bad-{time.monotonic_ns()}"
    client.app.send_task("inpaint", kwargs={"request": {k: v for k, v in request.items() if v is not None}},
                         task_id=job_id)
    return client.wait(job_id, timeout=60)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_ends_in_its_code_naming_the_field(client, worker, case):
    fields, code, field = ERRORS[case]
    status = send(client, {**GOOD, **fields})
    assert status.state == "FAILURE"
    assert status.error["code"] == code, status.error
    if field:
        assert status.error.get("field") == field or status.error["message"].startswith(f"{field}:"), status.error
    assert len(status.error["message"]) > len(field or "") + 10
    assert len(status.error["message"]) < 1000  # what it refused is quoted short, never whole


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_other_image_modes_are_converted_and_run(client, worker, case):
    status = send(client, {**GOOD, "image": CONVERTED[case]})
    assert status.state == "SUCCESS", status.error


def test_a_mask_of_another_size_is_stretched_to_the_image(stack, client, worker):
    status = send(client, {**GOOD, "mask_image": png(box_mask(32, 32, (8, 8, 20, 20)))})
    assert status.state == "SUCCESS" and (status.result.images[0].width, status.result.images[0].height) == (64, 64)
    stretched = send(client, {**GOOD, "mask_image": png(box_mask(32, 32, (8, 8, 20, 20)).resize((64, 64)))})
    # as if it had been given at 64x64
    assert np.array_equal(stored_pixels(stack, status), stored_pixels(stack, stretched))


def test_a_full_mask_repaints_everything(stack, client, worker):
    status = send(client, {**GOOD, "mask_image": png(Image.new("L", (64, 64), 255))})
    assert status.state == "SUCCESS"
    changed = (stored_pixels(stack, status) != np.asarray(photo()).astype(int)).any(axis=2)
    assert changed[::8, ::8].all()  # every part of the picture, corners and edges included


@pytest.mark.parametrize("key", ["photos/cat#1.png", "photos/cat?1.png", "photos/100%25 cat.png", "photos/a+b c.png",
                                 "photos/chat-ü-猫.png", "photos//cat.png", "/photos/cat.png"])
def test_an_s3_key_is_everything_after_the_bucket_byte_for_byte(stack, client, worker, key):
    s3 = stack.s3.client()
    s3.put_object(Bucket="inputs", Key=key, Body=PNG)
    for cut in ("photos/cat", "photos/cat.png", "photos/100"):  # what URL parsing read instead: not an image
        s3.put_object(Bucket="inputs", Key=cut, Body=b"another object")
    status = send(client, {**GOOD, "image": f"s3://inputs/{key}"})
    assert status.state == "SUCCESS", status.error


@pytest.mark.parametrize(("args", "kwargs", "got"), [
    ((), {"prompt": "a quince", "image": "s3://inputs/a.png", "mask_image": "s3://inputs/m.png"},
     "keyword arguments ['image', 'mask_image', 'prompt']"),  # the request's fields flat, as a Node client may send
    ((), {}, "no arguments"),
    (({"prompt": "a quince"},), {}, "1 positional argument"),
])
def test_a_message_without_one_request_argument_is_an_invalid_request(client, worker, args, kwargs, got):
    job_id = f"misaddressed-{time.monotonic_ns()}"
    client.app.send_task("inpaint", args=args, kwargs=kwargs, task_id=job_id)  # was a bare TypeError, no code
    status = client.wait(job_id, timeout=60)
    assert status.state == "FAILURE" and status.error["code"] == "invalid_request", status.error
    assert status.error["field"] == "request" and "one keyword argument, request" in status.error["message"]
    assert got in status.error["message"]


def test_the_worker_serves_the_next_job_after_all_that(client, worker):
    assert send(client, GOOD).state == "SUCCESS"
    assert client.app.control.ping(destination=[worker.node], timeout=2)


@pytest.mark.parametrize("task_id", ["2026/order-77", "../../etc/x", "order 77"])
def test_a_task_id_that_cannot_name_objects_is_refused_and_nothing_is_written(stack, client, worker, task_id):
    before = {item["Key"] for item in stack.s3.client().list_objects_v2(Bucket="outputs").get("Contents", [])}
    client.app.send_task("inpaint", kwargs={"request": GOOD}, task_id=task_id)  # client.submit refuses these
    status = client.wait(task_id, timeout=60)
    assert status.state == "FAILURE" and status.error["code"] == "invalid_request", status.error
    assert status.error["field"] == "job_id" and "must match" in status.error["message"]
    after = {item["Key"] for item in stack.s3.client().list_objects_v2(Bucket="outputs").get("Contents", [])}
    assert after == before  # "jobs/2026/order-77/0.png" would have replaced another job's image
