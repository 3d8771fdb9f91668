"""A job's clock: which stage it is in, how long each took, and throttled progress reports."""

from __future__ import annotations

import time
from collections.abc import Callable

from .schema import Progress, Stage

Reporter = Callable[[Progress], None]


def no_reporter(progress: Progress) -> None:
    return None


class Tracker:
    """Times stages and reports progress at most once per `interval_s`, always the last step."""

    def __init__(self, reporter: Reporter, interval_s: float):
        self.reporter = reporter
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.current: Stage | None = None
        self._stage_started = self.started
        self._last_report = float("-inf")
        self._denoise_started: float | None = None
        self._new_preview: str | None = None
        self.progress = Progress(stage="fetching")

    def enter(self, stage: Stage) -> None:
        """Move to `stage` (no-op if already there) and report it."""
        if stage == self.current:
            return
        self._close_stage()
        self.current = stage
        if stage == "denoising" and self._denoise_started is None:
            self._denoise_started = self._stage_started
        self.progress = self.progress.model_copy(update={"stage": stage})
        self._report(force=True)

    def plan(self, images: int, steps_per_image: int) -> None:
        """What the job will run, once its inputs are checked: progress counts towards it from the next report."""
        self.progress = self.progress.model_copy(update={"total_steps": images * steps_per_image, "images": images})

    def preview(self, reference: str) -> None:
        """A new preview image: reported with the next step, whatever the throttle."""
        self._new_preview = reference

    def step(self, image: int, images: int, step: int, steps_per_image: int) -> None:
        done, total = image * steps_per_image + step, images * steps_per_image
        now = time.monotonic()
        rate = (now - self._denoise_started) / done if self._denoise_started is not None else None
        self.progress = self.progress.model_copy(update={
            "step": done, "total_steps": total, "image": image, "images": images,
            "percent": round(100.0 * done / total, 1),
            "eta_s": round(rate * (total - done), 2) if rate is not None else None,
            "preview": self._new_preview or self.progress.preview,
        })
        self._report(force=done == total or self._new_preview is not None)
        self._new_preview = None

    def finish(self) -> dict[str, float]:
        self._close_stage()
        self.current = None
        self.timings["total"] = round(time.monotonic() - self.started, 4)
        return dict(self.timings)

    def _close_stage(self) -> None:
        now = time.monotonic()
        if self.current is not None:
            self.timings[self.current] = round(self.timings.get(self.current, 0.0) + now - self._stage_started, 4)
        self._stage_started = now

    def _report(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < self.interval_s:
            return
        self._last_report = now
        self.progress = self.progress.model_copy(update={"elapsed_s": round(now - self.started, 3)})
        self.reporter(self.progress)
