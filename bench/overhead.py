"""What the service adds to the model's own time: the same job called directly and sent through the queue.

    python bench/overhead.py [--sizes 256 512] [--repeats 5] [--quick]

(a) `pipe(...)` in this process with its image encoded as PNG (the same deliverable as the
service's); (b) `InpaintClient.submit` -> Redis -> a worker process -> S3 upload -> `wait`, on a
private redis-server and S3 endpoint (the embedded stack). Same weights (INPAINT_MODEL, else
the tiny random-weight model), seed and parameters, run in interleaved pairs. On a shared
machine the model's own time varies by more than the service's cost from one run to the next,
so what the service adds is read from each job itself: its round trip less the pipeline call as
the worker timed it, less the PNG encoding a direct caller pays too. The fixed cost of a job,
everything included, is an empty job's (16x16, one step) round trip against the same call
in-process, shown stage by stage. Last, the throughput of two workers against one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from worker.app import make_app  # noqa: E402
from worker.client import InpaintClient  # noqa: E402
from worker.model import generator, load_model, model_path  # noqa: E402
from worker.outputs import encode_output  # noqa: E402
from worker.schema import InpaintResult  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.stack import LocalStack  # noqa: E402

SERVICE_STAGES = ("fetching", "preprocessing", "postprocessing", "uploading")
MODEL_STAGES = ("encoding", "denoising", "decoding")
T = TypeVar("T")


def png(image: Image.Image) -> bytes:
    return encode_output(image, "png", quality=0)  # the worker's own encoder (quality is for JPEG/WebP)


def inputs(size: int) -> tuple[Image.Image, Image.Image]:
    image = Image.effect_noise((size, size), 40).convert("RGB")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image, mask


def direct(model, image: Image.Image, mask: Image.Image, params: dict) -> float:
    """The call, and its image encoded as PNG (the same deliverable as the service's); returns the encoding's time."""
    output = model.pipe(image=image, mask_image=mask, generator=generator(1), **params).images[0]
    started = time.perf_counter()
    png(output)
    return time.perf_counter() - started


def queued(client: InpaintClient, request: dict) -> InpaintResult:
    status = client.wait(client.submit(request), timeout=600)
    assert status.state == "SUCCESS", status.error
    return status.result


def timed(run: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, value


def stages_s(result: InpaintResult, stages: tuple[str, ...]) -> float:
    """The worker's own clock on these stages of the job (MODEL_STAGES: the pipeline call)."""
    return sum(result.timings.get(stage, 0.0) for stage in stages)


def compare(model, client: InpaintClient, size: int, image: Image.Image, mask: Image.Image, params: dict,
            repeats: int) -> str:
    """Direct and queued in interleaved pairs (which goes first alternates), after one warm-up of each."""
    request = {**params, "image": f"s3://inputs/{size}.png", "mask_image": f"s3://inputs/{size}-mask.png", "seed": 1,
               "plugins": {"paste_back": False}}
    run_direct, run_queued = partial(direct, model, image, mask, params), partial(queued, client, request)
    run_direct(), run_queued()
    rows = []
    for i in range(repeats):
        if i % 2:
            (b, result), (a, encode) = timed(run_queued), timed(run_direct)
        else:
            (a, encode), (b, result) = timed(run_direct), timed(run_queued)
        rows.append((a, b, encode, b - stages_s(result, MODEL_STAGES), stages_s(result, SERVICE_STAGES)))
    a, b, encode, outside, service = (statistics.median(column) for column in zip(*rows, strict=True))
    added = outside - encode
    return (f"{size}x{size}: direct {a * 1000:.0f} ms (PNG encoding included), through the service {b * 1000:.0f} ms, "
            f"ratio {b / a:.3f}; the service adds {added * 1000:.0f} ms a job ({added / a * 100:.1f} % of the direct "
            f"call): the round trip outside the pipeline call ({outside * 1000:.0f} ms) less the PNG encoding a "
            f"direct caller pays too ({encode * 1000:.0f} ms); the worker's fetch, hooks and upload "
            f"{service * 1000:.0f} ms")


class LatencyProxy:
    """A TCP proxy on loopback that holds each message for `delay_s`, as a network would (S3 in-region: 10-30 ms)."""

    def __init__(self, target_port: int, delay_s: float):
        self.target_port, self.delay_s = target_port, delay_s
        self.loop = asyncio.new_event_loop()
        self.port = 0

    def start(self) -> LatencyProxy:
        ready = threading.Event()

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True).start()
        ready.wait(10)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(1 << 16):
            await asyncio.sleep(self.delay_s / 2)  # half each way: a round trip costs delay_s
            sink.write(data)
            await sink.drain()
        sink.close()


def breakdown(runs: list[tuple[float, InpaintResult]]) -> str:
    """Submit to task start, the job's stages, then the rest: result.json stored, the result stored and read back."""
    parts: dict[str, list[float]] = {}
    for seconds, result in runs:
        queue = result.worker.get("queue_wait_s", 0.0)
        stages = {"queue wait": queue, **{s: t for s, t in result.timings.items() if s != "total"}}
        stages["result.json, then the result to the client"] = seconds - queue - result.timings["total"]
        for stage, t in stages.items():
            parts.setdefault(stage, []).append(t)
    return ", ".join(f"{stage} {statistics.median(t) * 1000:.1f}" for stage, t in parts.items())


def median_time(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--throughput-jobs", type=int, default=32)
    parser.add_argument("--s3-latency-ms", type=float, default=0.0,
                        help="the worker reaches S3 through a proxy adding this round-trip time (a real network)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the bench's workers, e.g. INPAINT_WARMUP=on (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps the script working in the tests")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps, args.repeats, args.throughput_jobs = [32], 2, 1, 4
    model = load_model(Settings())
    name = model_path(Settings())
    print(f"model {model.name} on {model.device} ({torch.get_num_threads()} threads), {args.steps} steps, "
          f"strength 1.0, median of {args.repeats}")
    stack = LocalStack(model=name).start()
    try:
        client = InpaintClient(make_app(stack.settings()))
        host = socket.gethostname()
        s3 = stack.s3.client()
        worker_env = dict(setting.split("=", 1) for setting in args.worker_env)
        if args.s3_latency_ms:
            proxy = LatencyProxy(stack.s3.port, args.s3_latency_ms / 1000).start()
            worker_env["INPAINT_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
            print(f"the worker's S3 calls take {args.s3_latency_ms:g} ms more (a proxy on loopback)")
        stack.start_worker(f"bench0@{host}", **worker_env).wait_ready(client.app)
        for size in args.sizes:
            image, mask = inputs(size)
            s3.put_object(Bucket="inputs", Key=f"{size}.png", Body=png(image))
            s3.put_object(Bucket="inputs", Key=f"{size}-mask.png", Body=png(mask))
            params = {"prompt": "a bench", "height": size, "width": size, "num_inference_steps": args.steps,
                      "strength": 1.0}

            print(compare(model, client, size, image, mask, params, args.repeats), flush=True)
        started = time.perf_counter()
        for i in range(20):
            s3.put_object(Bucket="outputs", Key=f"latency/{i}", Body=b"x" * 1024)
        print(f"S3 endpoint (moto server on loopback): {(time.perf_counter() - started) / 20 * 1000:.1f} ms a PUT; "
              "a job makes 4 S3 calls (2 GETs, 2 PUTs)")
        image, mask = inputs(16)
        s3.put_object(Bucket="inputs", Key="empty.png", Body=png(image))
        s3.put_object(Bucket="inputs", Key="empty-mask.png", Body=png(mask))
        empty = {"prompt": "x", "image": "s3://inputs/empty.png", "mask_image": "s3://inputs/empty-mask.png",
                 "num_inference_steps": 1, "strength": 1.0}
        runs = [timed(partial(queued, client, empty)) for _ in range(args.repeats + 1)][1:]
        round_trip = statistics.median(seconds for seconds, _ in runs)
        empty_call = {"prompt": "x", "num_inference_steps": 1, "strength": 1.0, "height": 16, "width": 16}
        alone = median_time(partial(direct, model, image, mask, empty_call), args.repeats)
        print(f"empty job (16x16, 1 step): round trip {round_trip * 1000:.0f} ms, the same call in-process "
              f"{alone * 1000:.0f} ms: the service's fixed cost is {(round_trip - alone) * 1000:.0f} ms a job")
        print("  where the round trip goes (medians, ms): " + breakdown(runs))

        small = {**empty, "height": 64, "width": 64, "num_inference_steps": args.steps}

        def throughput() -> float:
            started = time.perf_counter()
            jobs = [client.submit({**small, "seed": i}) for i in range(args.throughput_jobs)]
            for job_id in jobs:
                client.wait(job_id, timeout=600)
            return args.throughput_jobs / (time.perf_counter() - started)

        # scaling: each worker gets its share of the cores, as each gets its own GPU in production
        threads = str(max(1, (os.cpu_count() or 1) // 2))  # as `launch --cpu-workers 2` shares them
        stack.workers[0].stop()
        solo = stack.start_worker(f"solo@{host}", OMP_NUM_THREADS=threads, **worker_env)
        solo.wait_ready(client.app)
        one = throughput()
        solo.stop()
        pair = [stack.start_worker(f"pair{i}@{host}", OMP_NUM_THREADS=threads, **worker_env) for i in range(2)]
        for worker in pair:  # started together, so their model loads overlap
            worker.wait_ready(client.app)
        two = throughput()
        print(f"throughput ({args.throughput_jobs} jobs of 64x64, {threads} thread(s) a worker): 1 worker "
              f"{one:.2f} jobs/s, 2 workers {two:.2f} jobs/s, ratio {two / one:.2f}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
