"""Turning references into bytes, images and tensors, with limits on what may be read.

The local runner reads local paths and `data:` URLs; the queue's fetcher (worker.storage)
adds `s3://` and allowed `https://` hosts. Decoding guards against corrupt files and
decompression bombs.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from .errors import InputForbidden, InputNotFound, InvalidRequest

DATA_URL = re.compile(r"^(?i:data):(?P<type>[\w.+/-]*)(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;(?i:base64))?,"
                      r"(?P<data>.*)$", re.S)  # a scheme is case-insensitive (RFC 3986): DATA: is data:
MAX_DECODE_PIXELS = 50_000_000


class Fetcher(Protocol):
    def fetch(self, ref: str, field: str) -> bytes: ...


def read_data_url(ref: str, field: str, max_bytes: int) -> bytes:
    match = DATA_URL.match(ref)
    if not match:
        raise InvalidRequest(field, "malformed data: URL; expected data:<type>;base64,<data>")
    raw = match["data"]
    if match["b64"]:
        raw = re.sub(r"\s+", "", raw)  # line-wrapped base64 too
        if len(raw.rstrip("=")) * 3 // 4 > max_bytes:  # a cheap bound before decoding
            raise InvalidRequest(field, f"data: URL is over the {max_bytes}-byte cap")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(field, "data: URL is not valid base64") from None
    else:
        from urllib.parse import unquote_to_bytes

        data = unquote_to_bytes(raw)
    if len(data) > max_bytes:
        raise InvalidRequest(field, f"data: URL is over the {max_bytes}-byte cap")
    return data


class LocalFetcher:
    """Local files and `data:` URLs: for `inpaint-worker run` on one machine. Only regular files are read (not a
    device such as /dev/zero, nor a FIFO that would block), and no more than `input_max_bytes` of one."""

    def __init__(self, data_url_max_bytes: int, input_max_bytes: int = 50_000_000):
        self.data_url_max_bytes, self.input_max_bytes = data_url_max_bytes, input_max_bytes

    def fetch(self, ref: str, field: str) -> bytes:
        if ref[:5].lower() == "data:":
            return read_data_url(ref, field, self.data_url_max_bytes)
        scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", ref)
        if scheme and scheme[1].lower() != "file":
            raise InputForbidden(
                f"{field}: {scheme[1]}:// references are read by the queue worker, not the local runner; "
                "give a local path or a data: URL", field=field)
        path = Path(ref[len("file://"):] if scheme else ref).expanduser()
        shown = f"{str(path)[:200]}..." if len(str(path)) > 200 else str(path)
        if "\0" in str(path):
            raise InvalidRequest(field, f"the path {shown!r} holds a NUL character")
        try:
            return read_regular_file(path, self.input_max_bytes, field, shown)
        except FileNotFoundError:
            raise InputNotFound(f"{field}: no file at {shown}", field=field) from None
        except NotADirectoryError:
            raise InputNotFound(f"{field}: no file at {shown} (a part of the path is a file, not a folder)",
                                field=field) from None
        except PermissionError:
            raise InputForbidden(f"{field}: cannot read {shown}", field=field) from None
        except OSError as error:
            why = {errno.ENAMETOOLONG: "a name in it is longer than the system allows",
                   errno.ELOOP: "its symbolic links form a loop"}.get(error.errno, error.strerror)
            raise InvalidRequest(field, f"cannot read {shown}: {why}") from None


def read_regular_file(path: Path, max_bytes: int, field: str, shown: str) -> bytes:
    """A regular file's bytes, at most `max_bytes`. Opened without blocking (a FIFO would wait for a writer), then
    checked for what it is."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise InvalidRequest(field, f"{shown} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise InvalidRequest(field, f"{shown} is not a regular file (a device, a FIFO or a socket); give an image "
                                 "file")
        with open(descriptor, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise InvalidRequest(field, f"{shown} is over the {max_bytes}-byte cap")
    return data


def decode_image(data: bytes, field: str, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Decode an image fully, refusing corrupt, empty and oversized ones before they cost memory."""
    if not data:
        raise InvalidRequest(field, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest(field, f"{width}x{height} pixels is over the decode limit of {max_pixels}")
            if width == 0 or height == 0:
                raise InvalidRequest(field, "the image has no pixels")
            image.load()
        try:  # read now: the normalize plugin turns the image as its EXIF orientation says, and writes the EXIF back
            exif = image.getexif()
            if exif.get(0x0112, 1) != 1:  # Orientation
                exif.tobytes()
        except Exception as error:
            raise InvalidRequest(field, f"the image's EXIF metadata is corrupt ({error}); save the image again "
                                 "without it") from None
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(field, f"image is too large to decode (over {max_pixels} pixels)") from None
    except Exception as error:  # PIL raises many types for corrupt and truncated files
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))  # PIL names its in-memory file
        raise InvalidRequest(field, f"not a readable image (PNG, JPEG, WebP): {why}") from None
    return image


def load_tensor(data: bytes, field: str) -> Any:
    """A tensor parameter from a .safetensors file holding one tensor (or one named like the field)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as error:  # safetensors' SafetensorError, and torch's errors
        raise InvalidRequest(field, f"not a readable .safetensors file: {error}") from None
    if field in tensors:
        return tensors[field]
    if len(tensors) != 1:
        raise InvalidRequest(field, f"the .safetensors file holds {sorted(tensors)}; give one tensor, "
                             f"or name it {field!r}")
    return next(iter(tensors.values()))
