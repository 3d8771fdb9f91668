"""The errors a job can end with: a machine-readable code and a message a person can act on."""

from __future__ import annotations


class JobError(Exception):
    """A job failed for a reason the caller can see; `code` is stable, `message` is for people."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, plugin: str | None = None):
        from .schema import redacted_text  # schema raises these errors: imported here, not at the top

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
