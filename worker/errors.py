"""The errors a job can end with: a machine-readable code and a message a person can act on; and pydantic's
validation errors told that way (requests, plugin options, settings)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from .redaction import SECRET_KEY, redacted, redacted_text


class JobError(Exception):
    """A job failed for a reason the caller can see; `code` is stable, `message` is for people."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, plugin: str | None = None):
        message = redacted_text(message)  # a plugin's or a library's text can quote a signed URL
        super().__init__(message)
        self.message = message
        self.field = field
        self.plugin = plugin

    def to_dict(self) -> dict:
        return error_dict(self.code, self.message, self.field, self.plugin)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(JobError):
    code = "invalid_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field)
        self.detail = message  # what is wrong with the field, without its name


class InputNotFound(JobError):
    code = "input_not_found"


class InputForbidden(JobError):
    code = "input_forbidden"


class Cancelled(JobError):
    code = "cancelled"


class DeadlineExceeded(JobError):
    code = "deadline_exceeded"


class OutOfMemory(JobError):
    code = "out_of_memory"


class NumericalError(JobError):
    """The model's numbers overflowed (NaN or infinite latents): what it would write is noise."""

    code = "numerical_error"


class PluginError(JobError):
    code = "plugin_error"

    def __init__(self, plugin: str, hook: str, error: BaseException):
        super().__init__(
            f"plugin {plugin!r} raised in {hook}: {type(error).__name__}: {error}", plugin=plugin
        )


class StorageError(JobError):
    code = "storage_error"


class InternalError(JobError):
    code = "internal"


class JobFailed(Exception):
    """How a failed job is stored in the task state: JSON-safe args (code, message, field, plugin).

    Celery stores an exception as its type name and args, and rebuilds it as `cls(*args)`;
    a backend without this package reads the same four values from `exc_message`.
    """

    def __init__(self, code: str, message: str, field: str | None = None, plugin: str | None = None):
        super().__init__(code, message, field, plugin)
        self.code, self.message, self.field, self.plugin = code, message, field, plugin

    @classmethod
    def from_error(cls, error: JobError) -> JobFailed:
        return cls(error.code, error.message, error.field, error.plugin)

    def to_dict(self) -> dict:
        return error_dict(self.code, self.message, self.field, self.plugin)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def error_dict(code: str, message: str, field: str | None, plugin: str | None) -> dict:
    """An error as clients read it: code and message, and field or plugin when known."""
    return {"code": code, "message": message, **({"field": field} if field else {}),
            **({"plugin": plugin} if plugin else {})}


UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")
QUOTED_TYPES = ("int_", "float_", "string_", "bool_", "list_", "dict_", "literal_")  # a wrong type or value: say which


def describe_invalid(error: Any, field: Callable[[tuple], str] = lambda loc: ".".join(map(str, loc)),
                     quote_input: bool = True) -> tuple[str, str]:
    """One field and one message a person can act on, from a pydantic `ValidationError`: the first field named,
    every problem told (`"msg; other.field: msg"`). `field` names a location (a request's `plugins.mask.blur`,
    a setting's `INPAINT_MAX_STEPS`); a refused value is quoted short and redacted, never under a secret-named key,
    and not at all without `quote_input` (an operator's settings can be secrets)."""
    problems: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        # a union field (str | list[str]) reports one error per member, tagged in the location
        location = tuple(part for part in item["loc"] if not UNION_TAG.match(str(part)))
        name = field(location) or "request"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        messages = problems.setdefault(name, [])
        if message not in messages:
            messages.append(message)
        secret = any(SECRET_KEY.search(str(part)) for part in location)
        if quote_input and not secret and item["type"].startswith(QUOTED_TYPES):
            messages.append(f"(got {shown_input(redacted(item.get('input')))})")
    parts = [f"{name}: " * bool(i) + " or ".join(m for m in messages if not m.startswith("(got"))
             + "".join(f" {m}" for m in dict.fromkeys(messages) if m.startswith("(got"))
             for i, (name, messages) in enumerate(problems.items())]
    return next(iter(problems)), "; ".join(parts)


def shown_input(value: Any) -> str:
    """An input as an error quotes it: cut to 80 characters, a huge integer by its size (Python prints 4300 digits at
    most)."""
    if isinstance(value, int) and abs(value) >= 10**80:
        return f"an integer of about {round(abs(value).bit_length() * math.log10(2))} digits"
    return f"{value!r:.80}"


def connection_error(error: BaseException) -> BaseException | None:
    """The connection error behind `error` (itself, or what it was raised from), or None."""
    import kombu.exceptions
    import redis.exceptions

    kinds = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError,
             ConnectionError)
    return next((cause for cause in causes(error) if isinstance(cause, kinds)), None)


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and what it was raised from, five deep (Celery's "Retry limit exceeded" is a RuntimeError from one)."""
    for _ in range(5):
        if error is None:
            return
        yield error
        error = error.__cause__
