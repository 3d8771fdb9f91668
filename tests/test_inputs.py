"""Pure tests for reading references, decoding images and loading tensors: no model, no network."""

from __future__ import annotations

import base64
import io
import os
import random
import struct
import zlib

import pytest
from PIL import Image

from worker.errors import InputForbidden, InputNotFound, InvalidRequest
from worker.inputs import MAX_DECODE_PIXELS, LocalFetcher, decode_image, load_tensor, read_data_url

SIZE = (96, 64)


def encode(fmt: str, mode: str = "RGB", size: tuple[int, int] = SIZE) -> bytes:
    """A noisy image (so that cutting the file in half cuts into the pixel data), encoded in memory."""
    channels = len(mode)
    noise = random.Random(0).randbytes(size[0] * size[1] * channels)
    buffer = io.BytesIO()
    Image.frombytes(mode, size, noise).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR says width x height, with the IHDR CRC recomputed so it still parses."""
    data = bytearray(encode("PNG", size=(8, 8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def data_url(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def assert_invalid(caught: pytest.ExceptionInfo, field: str, *words: str) -> None:
    error = caught.value
    assert isinstance(error, InvalidRequest)
    assert error.code == "invalid_request"
    assert error.field == field
    assert error.to_dict()["field"] == field
    for word in words:
        assert word.lower() in error.message.lower(), (word, error.message)


# --- decode_image ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        pytest.param("PNG", "RGB", id="png-rgb"),
        pytest.param("PNG", "RGBA", id="png-rgba"),
        pytest.param("PNG", "L", id="png-grayscale-mask"),
        pytest.param("JPEG", "RGB", id="jpeg"),
        pytest.param("JPEG", "L", id="jpeg-grayscale"),
        pytest.param("WEBP", "RGB", id="webp"),
    ],
)
def test_decode_valid_images(fmt, mode):
    image = decode_image(encode(fmt, mode), "image")
    assert image.size == SIZE
    assert image.mode == mode
    assert image.format == fmt
    assert image.getpixel((0, 0)) is not None  # pixels are loaded, not lazy


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(b"this is not an image at all", ["not a readable image", "PNG, JPEG, WebP"], id="corrupt"),
        pytest.param(
            encode("PNG")[: len(encode("PNG")) // 2], ["not a readable image", "truncated"], id="truncated-png"
        ),
        pytest.param(encode("JPEG")[: len(encode("JPEG")) // 2], ["not a readable image"], id="truncated-jpeg"),
        pytest.param(encode("WEBP")[: len(encode("WEBP")) // 2], ["not a readable image"], id="truncated-webp"),
        pytest.param(encode("PNG")[:8], ["not a readable image"], id="png-signature-only"),
        pytest.param(b"", ["empty"], id="empty"),
    ],
)
def test_decode_rejects_unreadable(data, words):
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, "mask_image")
    assert_invalid(caught, "mask_image", *words)


def test_decode_rejects_decompression_bomb_without_allocating():
    # 10^10 pixels would be 30 GB as RGB: the header alone must be enough to refuse it.
    with pytest.raises(InvalidRequest) as caught:
        decode_image(png_claiming(100_000, 100_000), "image")
    assert_invalid(caught, "image", "too large", str(MAX_DECODE_PIXELS))


def test_decode_rejects_header_over_limit_below_pil_bomb_threshold():
    with pytest.raises(InvalidRequest) as caught:
        decode_image(png_claiming(8000, 8000), "image")
    assert_invalid(caught, "image", "8000x8000", "decode limit", str(MAX_DECODE_PIXELS))


def test_decode_respects_a_smaller_pixel_limit():
    with pytest.raises(InvalidRequest) as caught:
        decode_image(encode("PNG"), "image", max_pixels=SIZE[0] * SIZE[1] - 1)
    assert_invalid(caught, "image", f"{SIZE[0]}x{SIZE[1]}", "decode limit")
    assert decode_image(encode("PNG"), "image", max_pixels=SIZE[0] * SIZE[1]).size == SIZE


# --- data: URLs --------------------------------------------------------------------------------------------------


def test_data_url_base64_png_round_trips():
    png = encode("PNG")
    data = read_data_url(data_url(png), "image", max_bytes=len(png) + 10)
    assert data == png
    assert decode_image(data, "image").size == SIZE


def test_data_url_percent_encoded():
    assert read_data_url("data:text/plain,hello%20world", "prompt_embeds", max_bytes=100) == b"hello world"


def test_data_url_with_parameters():
    assert read_data_url("data:image/png;name=x.png;base64,aGk=", "image", max_bytes=100) == b"hi"


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        pytest.param("data:image/png;base64,!!!not base64!!!", ["not valid base64"], id="invalid-base64"),
        pytest.param("data:image/png;base64,aGk", ["not valid base64"], id="bad-padding"),
        pytest.param("data:image/png;base64", ["malformed", "data:<type>;base64,<data>"], id="no-comma"),
        pytest.param("data:image png;base64,aGk=", ["malformed"], id="space-in-type"),
    ],
)
def test_data_url_rejects_malformed(ref, words):
    with pytest.raises(InvalidRequest) as caught:
        read_data_url(ref, "mask_image", max_bytes=1000)
    assert_invalid(caught, "mask_image", *words)


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param(data_url(bytes(range(200))), id="base64"),
        pytest.param("data:text/plain," + "a" * 200, id="percent-encoded"),
    ],
)
def test_data_url_over_byte_cap(ref):
    with pytest.raises(InvalidRequest) as caught:
        read_data_url(ref, "image", max_bytes=100)
    assert_invalid(caught, "image", "over the 100-byte cap")


def test_data_url_under_byte_cap_without_padding():
    assert len(read_data_url(data_url(bytes(99)), "image", max_bytes=100)) == 99


def test_data_url_at_exactly_the_byte_cap():
    assert len(read_data_url(data_url(bytes(100)), "image", max_bytes=100)) == 100


# --- LocalFetcher ------------------------------------------------------------------------------------------------


@pytest.fixture
def fetcher() -> LocalFetcher:
    return LocalFetcher(data_url_max_bytes=1_000_000)


def test_local_fetcher_reads_a_path(fetcher, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(encode("PNG"))
    assert decode_image(fetcher.fetch(str(path), "image"), "image").size == SIZE


def test_local_fetcher_reads_file_url(fetcher, tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"mask bytes")
    assert fetcher.fetch(f"file://{path}", "mask_image") == b"mask bytes"


def test_local_fetcher_file_scheme_is_case_insensitive(fetcher, tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"mask bytes")
    assert fetcher.fetch(f"FILE://{path}", "mask_image") == b"mask bytes"


def test_local_fetcher_reads_data_url_with_its_cap(tmp_path):
    png = encode("PNG")
    assert LocalFetcher(data_url_max_bytes=len(png) + 10).fetch(data_url(png), "image") == png
    with pytest.raises(InvalidRequest) as caught:
        LocalFetcher(data_url_max_bytes=10).fetch(data_url(png), "image")
    assert_invalid(caught, "image", "over the 10-byte cap")


def test_local_fetcher_missing_file(fetcher, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputNotFound) as caught:
        fetcher.fetch(str(missing), "mask_image")
    error = caught.value
    assert error.code == "input_not_found"
    assert error.field == "mask_image"
    assert str(missing) in error.message
    assert error.to_dict() == {"code": "input_not_found", "message": error.message, "field": "mask_image"}


def test_local_fetcher_directory(fetcher, tmp_path):
    with pytest.raises(InvalidRequest) as caught:
        fetcher.fetch(str(tmp_path), "image")
    assert_invalid(caught, "image", "is a directory")


def hostile_path(kind: str, tmp_path) -> str:
    """A local reference as a careless or hostile request file gives it."""
    if kind == "symlink-loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        return str(tmp_path / "a")
    if kind == "under-a-file":
        (tmp_path / "photo.png").write_bytes(b"x")
        return str(tmp_path / "photo.png" / "mask.png")
    if kind == "fifo":  # reading it would wait for a writer for ever
        os.mkfifo(tmp_path / "pipe")
        return str(tmp_path / "pipe")
    if kind == "over-the-cap":
        (tmp_path / "big.png").write_bytes(bytes(2001))
        return str(tmp_path / "big.png")
    return {"nul-byte": f"{tmp_path}/a\0b.png", "name-over-the-os-limit": f"{tmp_path}/{'n' * 300}.png",
            "dev-zero": "/dev/zero"}[kind]


@pytest.mark.parametrize(("kind", "error_type", "words"), [
    ("nul-byte", InvalidRequest, "NUL character"),
    ("name-over-the-os-limit", InvalidRequest, "longer than the system allows"),
    ("under-a-file", InputNotFound, "a part of the path is a file"),
    ("symlink-loop", InvalidRequest, "symbolic links form a loop"),
    ("dev-zero", InvalidRequest, "not a regular file"),  # was read until MemoryError (3.4 GB)
    ("fifo", InvalidRequest, "not a regular file"),
    ("over-the-cap", InvalidRequest, "over the 2000-byte cap"),
])
def test_a_local_path_that_cannot_be_an_image_file_gets_its_code_and_a_short_message(tmp_path, kind, error_type,
                                                                                     words):
    with pytest.raises(error_type) as caught:
        LocalFetcher(data_url_max_bytes=1000, input_max_bytes=2000).fetch(hostile_path(kind, tmp_path), "image")
    assert caught.value.field == "image" and words in caught.value.message, caught.value.message
    assert len(caught.value.message) < 400  # a long path is cut, not repeated


def test_an_upper_case_data_url_is_a_data_url_with_its_cap():
    png = encode("PNG")
    shouted = "DATA:image/png;BASE64," + base64.b64encode(png).decode()
    assert LocalFetcher(data_url_max_bytes=len(png)).fetch(shouted, "image") == png
    with pytest.raises(InvalidRequest) as caught:
        LocalFetcher(data_url_max_bytes=10).fetch(shouted, "image")
    assert_invalid(caught, "image", "over the 10-byte cap")
    assert len(caught.value.message) < 100  # not read as a path, repeating the whole URL


def test_an_image_whose_exif_is_corrupt_is_the_requests_fault_naming_the_field():
    png = encode("PNG")
    chunk = b"eXIf" + b"garbage!!"
    corrupt = png[:33] + struct.pack(">I", 9) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]
    with pytest.raises(InvalidRequest) as caught:
        decode_image(corrupt, "mask_image")
    assert_invalid(caught, "mask_image", "EXIF metadata is corrupt")


@pytest.mark.parametrize(
    ("ref", "scheme"),
    [
        pytest.param("s3://bucket/key.png", "s3", id="s3"),
        pytest.param("https://example.com/image.png", "https", id="https"),
        pytest.param("http://example.com/image.png", "http", id="http"),
        pytest.param("ftp://example.com/image.png", "ftp", id="ftp"),
        pytest.param("HTTPS://example.com/image.png", "HTTPS", id="https-upper-case"),
    ],
)
def test_local_fetcher_forbids_remote_refs(fetcher, ref, scheme):
    with pytest.raises(InputForbidden) as caught:
        fetcher.fetch(ref, "image")
    error = caught.value
    assert error.code == "input_forbidden"
    assert error.field == "image"
    assert f"{scheme}://" in error.message
    assert "local path or a data: URL" in error.message


# --- load_tensor -------------------------------------------------------------------------------------------------


@pytest.fixture
def torch_save():
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    return torch, safetensors_torch.save


def test_load_tensor_single_tensor(torch_save):
    torch, save = torch_save
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    loaded = load_tensor(save({"anything": tensor}), "prompt_embeds")
    assert torch.equal(loaded, tensor)
    assert loaded.dtype == torch.float32 and tuple(loaded.shape) == (2, 3)


def test_load_tensor_picks_the_one_named_like_the_field(torch_save):
    torch, save = torch_save
    wanted = torch.ones(1, 4, dtype=torch.bfloat16)
    loaded = load_tensor(save({"other": torch.zeros(3), "latents": wanted}), "latents")
    assert torch.equal(loaded, wanted)
    assert loaded.dtype == torch.bfloat16


def test_load_tensor_ambiguous_lists_names(torch_save):
    torch, save = torch_save
    with pytest.raises(InvalidRequest) as caught:
        load_tensor(save({"alpha": torch.zeros(1), "beta": torch.ones(2)}), "prompt_embeds_mask")
    assert_invalid(caught, "prompt_embeds_mask", "'alpha'", "'beta'", "give one tensor", "'prompt_embeds_mask'")


def test_load_tensor_empty_file_lists_nothing(torch_save):
    _, save = torch_save
    with pytest.raises(InvalidRequest) as caught:
        load_tensor(save({}), "latents")
    assert_invalid(caught, "latents", "holds []", "give one tensor")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"definitely not safetensors", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(encode("PNG"), id="png-instead"),
    ],
)
def test_load_tensor_rejects_garbage(torch_save, data):
    with pytest.raises(InvalidRequest) as caught:
        load_tensor(data, "negative_prompt_embeds")
    assert_invalid(caught, "negative_prompt_embeds", "not a readable .safetensors file")


# --- StorageFetcher: s3:// ---------------------------------------------------------------------------------------


def test_an_s3_input_on_an_unreachable_endpoint_is_a_storage_error_naming_the_field(monkeypatch):
    """Reads that fail on every try (the endpoint is down) still tell the user which input could not be read."""
    import socket

    from worker.errors import StorageError
    from worker.settings import Settings
    from worker.storage import StorageFetcher

    for name, value in {"AWS_ACCESS_KEY_ID": "KEYID456", "AWS_SECRET_ACCESS_KEY": "SECRET789",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as closed:  # a loopback port nothing listens on: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = Settings(s3_endpoint_url=f"http://127.0.0.1:{port}", input_buckets=["uploads"], storage_attempts=2,
                        storage_backoff_s=0)
    with pytest.raises(StorageError) as caught:
        StorageFetcher(settings).fetch("s3://uploads/house-mask.png", "mask_image")
    error = caught.value
    assert error.code == "storage_error"
    assert error.field == "mask_image" and error.to_dict()["field"] == "mask_image"
    assert error.message.startswith("mask_image: ") and "s3://uploads/house-mask.png" in error.message
    assert "SECRET789" not in error.message and "KEYID456" not in error.message


def test_an_image_whose_exif_cannot_be_written_back_when_turned_is_the_requests_fault():
    import struct as _struct

    exif = Image.Exif()
    exif[0x0112], exif[0x0131] = 6, "sw"  # orientation 6: the normalize plugin turns it and writes the EXIF back
    raw = exif.tobytes().replace(_struct.pack(">H", 0x0131), _struct.pack(">H", 322))  # TileWidth holding text
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buffer, format="JPEG", exif=raw)
    with pytest.raises(InvalidRequest) as caught:  # was plugin_error from normalize
        decode_image(buffer.getvalue(), "image")
    assert_invalid(caught, "image", "EXIF metadata is corrupt")


def test_a_line_wrapped_base64_data_url_under_the_cap_is_read():
    data = bytes(range(256)) * 3900  # 998400 bytes: wrapped at 76 characters, its text is far over the cap
    wrapped = "data:application/octet-stream;base64," + base64.encodebytes(data).decode()
    assert read_data_url(wrapped, "latents", max_bytes=1_000_000) == data
