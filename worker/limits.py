"""What a worker allows (pixel budget, steps, images, deadline, the model's size factor), checked against a request
once the model is known, and the default size a job works at."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidRequest
from .schema import InpaintRequest


@dataclass(frozen=True)
class Limits:
    """What a worker allows; checked against a request once the model is known."""

    max_pixels: int
    max_steps: int
    max_images: int
    max_deadline_s: float
    size_factor: int

    def check(self, request: InpaintRequest) -> None:
        self.check_steps(request.num_inference_steps)
        self.check_images(request.image_count)
        if request.deadline_s is not None and request.deadline_s > self.max_deadline_s:
            raise InvalidRequest("deadline_s", f"{request.deadline_s} is over this worker's cap of "
                                 f"{self.max_deadline_s} s")
        for name in ("height", "width"):
            value = getattr(request, name)
            if value is not None:
                self.check_side(value, name)
            if value is not None and value % self.size_factor:
                raise InvalidRequest(
                    name, f"{value} is not a multiple of {self.size_factor} (the model's size factor); "
                    f"try {max(self.size_factor, round(value / self.size_factor) * self.size_factor)}"
                )

    def check_steps(self, num_inference_steps: int) -> None:
        if num_inference_steps > self.max_steps:
            raise InvalidRequest(
                "num_inference_steps", f"{num_inference_steps} is over this worker's cap of {self.max_steps}"
            )

    def check_images(self, count: int) -> None:
        if count > self.max_images:
            raise InvalidRequest(
                "num_images_per_prompt",
                f"the job would make {count} images (prompts x num_images_per_prompt); this worker allows at most "
                f"{self.max_images}",
            )

    def check_side(self, value: int, field: str) -> None:
        if value > self.max_side:
            raise InvalidRequest(field, f"{value} px is over the longest side this model can work at, {self.max_side} "
                                 f"px (its position table covers 4096 patches of {self.size_factor} px)")

    def check_size(self, width: int, height: int, field: str = "height") -> None:
        if width * height > self.max_pixels:
            raise InvalidRequest(
                field, f"{width}x{height} is {width * height} pixels, over this worker's budget of "
                f"{self.max_pixels}"
            )

    def default_size(self, width: int, height: int) -> tuple[int, int]:
        """The input's own size, scaled down to the pixel budget and the model's longest side, rounded down to the
        size factor. A side too short to scale (a 1x4000000 strip) is raised to one factor, and the other is
        shortened to keep within both."""
        f, most = self.size_factor, self.max_side
        scale = min(1.0, math.sqrt(self.max_pixels / (width * height)), most / max(width, height))
        fitted_w, fitted_h = max(f, int(width * scale) // f * f), max(f, int(height * scale) // f * f)
        if fitted_w * fitted_h > self.max_pixels:  # a side raised to one factor leaves less room for the other
            if fitted_w == f:
                fitted_h = max(f, min(self.max_pixels // f, most) // f * f)
            else:
                fitted_w = max(f, min(self.max_pixels // f, most) // f * f)
        return fitted_w, fitted_h

    @property
    def max_side(self) -> int:
        """The longest side the model can work at: Qwen-Image's position table has 4096 entries, shared by half the
        image's longest side (in patches of `size_factor` pixels) and the prompt's tokens (1024 at most)."""
        return 4096 * self.size_factor
