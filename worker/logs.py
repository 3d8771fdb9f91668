"""Worker logging: text or JSON lines, and the id of the running job on every line logged while it runs."""

from __future__ import annotations

import contextvars
import importlib
import json
import logging
import time

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_job", default=None)


class JobIdFilter(logging.Filter):
    """Tags each record with the running job's id; Celery's own lines about the task get it too."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = current_job.get() or _celery_task_id()
        if record.name == "celery.app.trace" and isinstance(record.args, dict) and "return_value" in record.args:
            # the result holds presigned URLs, which grant access: it belongs in the task state, not the log
            record.args = {**record.args, "return_value": "(result stored in the task state)"}
        return True


def _celery_task_id() -> str | None:
    from celery import current_task

    request = getattr(current_task, "request", None) if current_task else None
    return getattr(request, "id", None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if getattr(record, "job_id", None):
            line["job_id"] = record.job_id
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(job_prefix)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job_id", None)
        record.job_prefix = f"[job {job}] " if job else ""
        return super().format(record)


MODEL_LIBRARIES = ("diffusers", "transformers")


def configure(fmt: str = "text", level: str | int = "INFO", libraries: tuple[str, ...] = MODEL_LIBRARIES) -> None:
    """The root logger's one handler, in `fmt`, at `level`; `libraries` that log through handlers of their own go
    through it too (importing them: a process without the model, like `launch`, passes none)."""
    level = level.upper() if isinstance(level, str) else level  # logging knows "DEBUG", not "debug"
    handler = logging.StreamHandler()
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.setLevel(level)  # also for libraries' loggers, which keep levels of their own
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings (Celery's, torch's) as log lines of the logger py.warnings
    for library in libraries:
        through_root(library)


def through_root(library: str) -> None:
    """A library's log lines through the root handler (our format, the job's id, the level) rather than the stderr
    handler of its own that diffusers and transformers each install."""
    try:
        library_logging = importlib.import_module(f"{library}.utils.logging")
    except ImportError:  # a client's install has neither
        return
    library_logging.disable_default_handler()
    library_logging.enable_propagation()
    library_logging.disable_progress_bar()  # the bars of loading a model: not log lines (the load time is logged)
