"""The old home of the pipeline subclass and its speed options (until 2026-12): they live in worker/pipeline.py and
worker/speed.py now; their names still work here, deprecated, for plugins and scripts written against them."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

MOVED = {**dict.fromkeys(("InpaintPipeline", "MASK_GRIDS", "upstream_signature"), "worker.pipeline"),
         **dict.fromkeys(("CfgBatcher", "speed_up", "uncompile_blocks", "quantize_blocks_fp8", "Fp8Linear"),
                         "worker.speed")}


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module 'worker.inpaint_pipeline' has no attribute {name!r}")
    warnings.warn(f"worker.inpaint_pipeline.{name} is deprecated: import it from {MOVED[name]}", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(MOVED[name]), name)
