"""A job's clock: which stage it is in, how long each took, throttled progress reports, and the time left.

The time left is the whole job's: the steps still to run at this job's pace, then what a job at this size spends
after its steps (each image's encoding and decoding, the job's postprocessing and upload), as the last job this
process ran at the size spent it (at another size, scaled by the pixels). Before any job has run, it counts the
steps only, and once they are done it is unknown (None), never "0 s left" while the decoding and upload run.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .schema import Progress, Stage

Reporter = Callable[[Progress], None]
AFTER_STEPS = ("encoding", "decoding", "postprocessing", "uploading")
# pixels -> seconds of each stage in AFTER_STEPS (encoding and decoding per image), from the last job at that size
_spent_at_size: dict[int, dict[str, float]] = {}


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
        self._entered: Counter[str] = Counter()
        self.pixels = 0
        self._new_preview: str | None = None
        self.progress = Progress(stage="fetching")

    def enter(self, stage: Stage) -> None:
        """Move to `stage` (no-op if already there) and report it."""
        if stage == self.current:
            return
        self._close_stage()
        self.current = stage
        self._entered[stage] += 1
        self.progress = self.progress.model_copy(update={"stage": stage})
        self._report(force=True)

    def plan(self, images: int, steps_per_image: int, pixels: int = 0) -> None:
        """What the job will run, once its inputs are checked (`pixels`: the size it works at): progress counts
        towards it from the next report."""
        self.pixels = pixels
        self.progress = self.progress.model_copy(update={"total_steps": images * steps_per_image, "images": images})

    def preview(self, reference: str) -> None:
        """A new preview image: reported with the next step, whatever the throttle."""
        self._new_preview = reference

    def step(self, image: int, images: int, step: int, steps_per_image: int) -> None:
        done, total = image * steps_per_image + step, images * steps_per_image
        self.progress = self.progress.model_copy(update={
            "step": done, "total_steps": total, "image": image, "images": images,
            "percent": round(100.0 * done / total, 1),
            "preview": self._new_preview or self.progress.preview,
        })
        self._report(force=done == total or self._new_preview is not None)
        self._new_preview = None

    def finish(self) -> dict[str, float]:
        self._close_stage()
        self.current = None
        self.timings["total"] = round(time.monotonic() - self.started, 4)
        images = max(self.progress.images, 1)
        if self.pixels:  # what the next job at this size will spend after its steps
            _spent_at_size[self.pixels] = {stage: self.timings.get(stage, 0.0) / (images if stage in ("encoding",
                                           "decoding") else 1) for stage in AFTER_STEPS}
        return dict(self.timings)

    def time_left(self, now: float) -> float | None:
        """Seconds the job has left, by its pace so far and what a job at its size spent after its steps; None
        before its first step (no pace yet), and after its last one when no job has shown what comes after."""
        progress = self.progress
        spent = self._spent_after_steps()
        if not progress.step or (not spent and progress.step >= progress.total_steps):
            return None
        in_stage = now - self._stage_started
        denoised = self.timings.get("denoising", 0.0) + (in_stage if self.current == "denoising" else 0.0)
        left = denoised / progress.step * (progress.total_steps - progress.step)
        for stage, each in spent.items():
            times = progress.images if stage in ("encoding", "decoding") else 1
            left += each * max(times - self._entered[stage], 0)
            if stage == self.current:
                left += max(each - in_stage, 0.0)
        return round(left, 2)

    def _spent_after_steps(self) -> dict[str, float]:
        """The last job's after-step seconds at this size; at another size, scaled by the pixels; none known: 0."""
        if not _spent_at_size or not self.pixels:
            return {}
        nearest = min(_spent_at_size, key=lambda pixels: abs(pixels - self.pixels))
        scale = self.pixels / nearest
        return {stage: seconds * scale for stage, seconds in _spent_at_size[nearest].items()}

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
        self.progress = self.progress.model_copy(update={"elapsed_s": round(now - self.started, 3),
                                                         "eta_s": self.time_left(now)})
        self.reporter(self.progress)
