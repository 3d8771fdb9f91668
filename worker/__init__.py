"""qwen-inpaint-worker: Qwen-Image inpainting jobs with pluggy hooks, run in-process or by Celery workers."""

__version__ = "0.1.0"
