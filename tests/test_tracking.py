"""The time left a job reports: its remaining steps at its own pace, then what a job at its size spent after its
steps (decoding, postprocessing, uploading), on a clock the test moves."""

from __future__ import annotations

import pytest

from worker import tracking
from worker.schema import Progress

PIXELS = 768 * 576


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    tracking._spent_at_size.clear()  # what earlier jobs in this process spent
    clock = Clock()
    monkeypatch.setattr(tracking.time, "monotonic", clock)
    yield clock
    tracking._spent_at_size.clear()


def run_job(clock: Clock, reports: list[Progress], pixels: int = PIXELS, images: int = 1, steps: int = 4,
            until: tuple[int, int] | None = None) -> tracking.Tracker:
    """One job through its stages: a step takes 1 s, encoding 0.5 s and decoding 3 s an image, postprocessing
    0.5 s, uploading 1.5 s; stopped at (image, step) when `until` is given."""
    tracker = tracking.Tracker(reports.append, interval_s=0)
    tracker.enter("fetching")
    clock.now += 0.2
    tracker.enter("preprocessing")
    tracker.plan(images, steps, pixels)
    for image in range(images):
        tracker.enter("encoding")
        clock.now += 0.5
        tracker.enter("denoising")
        for step in range(1, steps + 1):
            clock.now += 1.0
            tracker.step(image, images, step, steps)
            if (image, step) == until:
                return tracker
        tracker.enter("decoding")
        clock.now += 3.0
    tracker.enter("postprocessing")
    clock.now += 0.5
    tracker.enter("uploading")
    clock.now += 1.5
    tracker.finish()
    return tracker


def test_the_first_job_counts_its_remaining_steps_only_then_says_it_does_not_know(clock):
    reports: list[Progress] = []
    run_job(clock, reports, until=(0, 2))
    assert reports[-1].eta_s == 2.0  # 2 steps of 1 s: nothing is known yet of decoding and uploading
    reports.clear()
    run_job(clock, reports)  # still the first to finish in this process: after its steps, no "0 s left"
    last_step = next(report for report in reports if report.step == report.total_steps)
    assert last_step.eta_s is None and all(report.eta_s is None for report in reports if report.stage != "denoising")


def test_after_one_job_at_a_size_the_time_left_includes_decoding_and_uploading(clock):
    run_job(clock, [])
    reports: list[Progress] = []
    tracker = run_job(clock, reports, until=(0, 2))
    assert reports[-1].eta_s == 2.0 + 3.0 + 0.5 + 1.5  # was 2.0: "about 0 s left" for the last quarter of the job
    for step in (3, 4):
        clock.now += 1.0
        tracker.step(0, 1, step, 4)
    assert reports[-1].eta_s == 3.0 + 0.5 + 1.5  # was 0
    tracker.enter("decoding")
    clock.now += 1.0
    assert tracker.time_left(clock.now) == 2.0 + 0.5 + 1.5
    clock.now += 1.0
    tracker.enter("postprocessing")  # decoding took 2 s, not 3: what is left is what is left
    assert reports[-1].eta_s == 0.5 + 1.5
    clock.now += 0.25
    tracker.enter("uploading")
    assert reports[-1].eta_s == 1.5


def test_each_image_still_to_make_adds_its_encoding_and_decoding(clock):
    run_job(clock, [], images=2)
    reports: list[Progress] = []
    run_job(clock, reports, images=2, until=(0, 4))
    assert reports[-1].eta_s == 4 * 1.0 + (3.0 + 0.5) + 3.0 + 0.5 + 1.5  # image 2's steps, both decodes, one encode


def test_at_another_size_the_time_after_the_steps_is_scaled_by_the_pixels(clock):
    run_job(clock, [])
    reports: list[Progress] = []
    run_job(clock, reports, pixels=2 * PIXELS, until=(0, 2))
    assert reports[-1].eta_s == 2.0 + 2 * (3.0 + 0.5 + 1.5)
