"""`inpaint-worker`: run, launch, submit, up (a local stack), tiny-model, plugins."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import InvalidRequest, JobError, describe_invalid

# exit statuses (submit documents them in its --help)
EXIT_FAILED = 1  # the job failed, or what it needs (Redis, the model) could not be reached or loaded
EXIT_INVALID = 2  # a bad request, flag or INPAINT_* setting (argparse uses 2 for usage errors too)
EXIT_TIMED_OUT = 3  # submit --timeout passed; the job goes on
URL = re.compile(r"^((?i:data):|[A-Za-z][A-Za-z0-9+.-]*://)")  # anything else is a local path
SAMPLES = Path(__file__).resolve().parent.parent / "examples"  # in a source checkout; not in the wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inpaint-worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one job in-process on local files")
    run.add_argument("--image", help="the image to inpaint (path or data: URL)")
    run.add_argument("--mask", help="the mask: white is repainted")
    run.add_argument("--prompt", help="what to paint in the masked area")
    run.add_argument("--out", default="out", help="directory for the images and result.json (default: out)")
    run.add_argument("--request", help="a JSON file with the request; flags override its fields")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="any request field; VALUE is parsed as JSON when it can be (repeatable)")
    run.add_argument("--model", help="model directory or hub id (default: INPAINT_MODEL, else the tiny model)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    launch = commands.add_parser("launch", help="start one worker per GPU (or N CPU workers) and supervise them")
    launch.add_argument("--cpu-workers", type=int, default=0, metavar="N", help="on a host without GPUs")
    launch.add_argument("--queues", metavar="A,B", help="the queues these workers take jobs from, the most urgent "
                        "priority first across them (default: INPAINT_QUEUE): a pool of GPUs for one class of work")

    submit = commands.add_parser(
        "submit", help="enqueue a job and follow its progress, then print the result",
        description="Enqueue a job (INPAINT_BROKER_URL), follow its progress, print its status as JSON. Exit "
        "status: 0 succeeded; 1 failed, or Redis could not be reached; 2 invalid request (refused here or by the "
        "worker); 3 --timeout passed (the job goes on).")
    submit.add_argument("--image", help="s3://bucket/key, https:// on an allowed host, or a local file (sent inline)")
    submit.add_argument("--mask", help="the mask, as --image")
    submit.add_argument("--prompt")
    submit.add_argument("--request", help="a JSON file with the request; flags override its fields")
    submit.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    submit.add_argument("--job-id", help="idempotency: the same id is enqueued once")
    submit.add_argument("--queue", help="a named queue (default: INPAINT_QUEUE); the priority is the request's "
                        "(--set priority=9: the least urgent)")
    submit.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="stop following after S seconds (default: 3600) and exit 3; the job goes on")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")

    up = commands.add_parser("up", help="run the whole stack on this machine: redis-server, S3 on loopback, a worker")
    up.add_argument("--demo", action="store_true", help="submit one job, follow it, download the result, stop")
    up.add_argument("--image", help="the demo's image (default: examples/sample.png of the source checkout)")
    up.add_argument("--mask", help="the demo's mask (default: examples/sample-mask.png of the source checkout)")
    up.add_argument("--prompt", default="a red barn with a white door")
    up.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")

    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight Qwen-Image pipeline to DIR")
    tiny.add_argument("directory")

    plugins = commands.add_parser("plugins", help="list the plugins and the hooks each implements")
    plugins.add_argument("--json", action="store_true")

    exporter = commands.add_parser("metrics", help="serve the queues' Prometheus metrics (depth by priority, the "
                                   "oldest wait) for an autoscaler; needs Redis, not a GPU")
    exporter.add_argument("--port", type=int, default=9150)
    exporter.add_argument("--address", default="127.0.0.1", help="0.0.0.0 in a container")
    exporter.add_argument("--queues", metavar="A,B", help="the queues to report (default: INPAINT_QUEUE)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    commands = {"run": cmd_run, "launch": cmd_launch, "submit": cmd_submit, "up": cmd_up,
                "tiny-model": cmd_tiny_model, "plugins": cmd_plugins, "metrics": cmd_metrics}
    from pydantic import ValidationError

    try:
        return commands[args.command](args)
    except ValidationError as error:  # requests are checked where they are built: this is the settings
        if error.title != "Settings":
            raise
        print(f"error: {settings_error(error)}", file=sys.stderr)
        return EXIT_INVALID


def settings_error(error: Any) -> str:
    """A bad INPAINT_* setting in one line, by variable name and rule, never echoing the value (it may be a secret)."""
    field, message = describe_invalid(error, lambda loc: f"INPAINT_{str(loc[0]).upper()}" if loc else "settings",
                                      quote_input=False)
    return f"invalid setting: {field}: {message}"


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if args.request:
        request = paths_from_folder(read_request_file(args.request), Path(args.request).parent)
    for flag, name in (("image", "image"), ("mask", "mask_image"), ("prompt", "prompt")):
        if getattr(args, flag) is not None:
            request[name] = getattr(args, flag)
    for item in args.set:
        name, sep, raw = item.partition("=")
        if not sep:
            raise InvalidRequest("--set", f"{item!r} is not FIELD=VALUE")
        try:
            request[name] = read_json(raw, f"--set {name}")
        except json.JSONDecodeError:
            request[name] = raw
    return request


def read_json(text: str, where: str) -> Any:
    """JSON as a request takes it: a key given twice is refused (json takes the last one silently, so a request
    edited by hand would run with a value its author did not see), and so is nesting deeper than Python's stack."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        twice = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        if twice:
            raise InvalidRequest(where, f"gives {', '.join(map(repr, twice))} twice; give each field once")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise InvalidRequest(where, "is nested too deep to read; a request is a few levels deep") from None
    except json.JSONDecodeError:
        raise
    except ValueError as error:  # e.g. an integer of over 4300 digits, which Python will not read
        raise InvalidRequest(where, f"cannot be read: {str(error)[:200]}") from None


def paths_from_folder(request: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A request file's relative local paths (images, tensors) resolved against the file's folder, not the current
    directory: a job.json beside its pictures runs from anywhere. URLs, absolute and ~ paths are left as they are."""
    from .schema import REFERENCE_FIELDS

    for name in REFERENCE_FIELDS:
        ref = request.get(name)
        if isinstance(ref, str) and ref and not URL.match(ref) and not ref.startswith("~") \
                and not Path(ref).is_absolute():
            request[name] = str(folder / ref)
    return request


def read_request_file(path: str) -> Any:
    try:
        request = read_json(Path(path).read_text(), "--request")
    except OSError as error:
        raise InvalidRequest("--request", f"cannot read {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest("--request", f"{path} is not a JSON object: {error}") from None
    if not isinstance(request, dict):
        raise InvalidRequest("--request", f"{path} holds a JSON {type(request).__name__}; a request is an object")
    return request


def cmd_run(args: argparse.Namespace) -> int:
    from .settings import Settings

    settings = Settings(**({"model": args.model} if args.model else {}))
    try:
        request = build_request(args)  # a bad request file is refused before torch is imported (seconds)
        from . import job
        from .inputs import LocalFetcher
        from .model import load_model
        from .outputs import DirectorySink
        from .plugins import Plugins
        from .tracking import no_reporter

        plugins = Plugins(blocked=settings.plugins_blocked)
        try:
            model = load_model(settings, plugins)
        except Exception as error:  # a wrong path, hub id or network: one line, not the loader's traceback
            logging.getLogger(__name__).debug("model load failed", exc_info=True)
            print(f"error: {model_error(settings.model, error)}", file=sys.stderr)
            return EXIT_FAILED
        if model.tiny:
            print(f"note: using the {model.describe()['label']} (set INPAINT_MODEL or --model for a real one)",
                  file=sys.stderr)
        reporter = no_reporter if args.quiet else ProgressBar()
        fetcher = LocalFetcher(settings.data_url_max_bytes, settings.input_max_bytes)
        result = job.run(request, model=model, plugins=plugins, fetcher=fetcher,
                         sink=DirectorySink(args.out), settings=settings, reporter=reporter)
    except JobError as error:
        print(json.dumps({"error": error.to_dict()}, indent=2))
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID if error.code == "invalid_request" else EXIT_FAILED
    print(result.model_dump_json(indent=2))
    return 0


def model_error(name: str | None, error: Exception) -> str:
    if name and name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        return f"cannot load the model: {name} does not exist (--model or INPAINT_MODEL: a local directory or a " \
               "hub id such as Qwen/Qwen-Image)"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"cannot load the model {name or '(tiny)'}: {type(error).__name__}: {first[:300]}"


class ProgressBar:
    """A one-line progress bar on stderr over the steps that really run."""

    last: Any = None

    def __call__(self, progress: Any) -> None:
        self.last = progress
        if progress.total_steps:
            filled = int(30 * progress.step / progress.total_steps)
            eta = f" eta {progress.eta_s:.1f}s" if progress.eta_s is not None else ""
            line = (f"[{'#' * filled}{'.' * (30 - filled)}] {progress.step}/{progress.total_steps} "
                    f"{progress.stage:<14}{eta}")
        else:
            line = f"{progress.stage}..."
        end = "\n" if progress.stage == "uploading" else ""
        print(f"\r{line:<70}", end=end, file=sys.stderr, flush=True)

    def waiting(self, place: Any) -> None:
        """A queued job's place: `queued: 3rd of 12 in celery, starts in about 40 s`."""
        start = f", starts in about {place.starts_in_s:.0f} s" if place.starts_in_s is not None else ""
        print(f"\r{f'queued: {place.position} of {place.waiting} in {place.queue}{start}':<70}", end="",
              file=sys.stderr, flush=True)

    def finish(self, state: str) -> None:
        """A job followed by polling can end between two polls: a success shows its bar full."""
        last = self.last
        if state == "SUCCESS" and last is not None and last.total_steps and last.step < last.total_steps:
            self(last.model_copy(update={"step": last.total_steps, "stage": "uploading", "eta_s": None}))
        elif last is None or last.stage != "uploading":  # the line is still open
            print(file=sys.stderr)


def cmd_launch(args: argparse.Namespace) -> int:
    from . import logs
    from .launch import launch
    from .settings import Settings

    settings = Settings()
    logs.configure(settings.log_format, settings.log_level, libraries=())  # its lines as the workers': text or JSON
    try:
        queues = queue_names(args.queues, settings)
    except InvalidRequest as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_INVALID
    return launch(settings, cpu_workers=args.cpu_workers, queues=queues)


def queue_names(flag: str | None, settings: Any) -> list[str]:
    """A --queues flag's names, checked as a queue name is; the default queue without one."""
    from .queues import QUEUE_PATTERN

    names = [name.strip() for name in (flag or settings.queue).split(",") if name.strip()]
    bad = [name for name in names if not re.fullmatch(QUEUE_PATTERN, name)]
    if not names or bad:
        raise InvalidRequest("--queues", f"{bad or flag!r}: give queue names matching {QUEUE_PATTERN}, separated by "
                             "commas")
    return names


def cmd_metrics(args: argparse.Namespace) -> int:
    import time

    from prometheus_client import REGISTRY, start_http_server

    from .app import make_app
    from .metrics import QueueCollector
    from .settings import Settings

    settings = Settings()
    try:
        names = queue_names(args.queues, settings)
    except InvalidRequest as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_INVALID
    REGISTRY.register(QueueCollector(make_app(settings, client=True), lambda: names))
    start_http_server(args.port, addr=args.address)
    print(f"queue metrics of {', '.join(names)} on http://{args.address}:{args.port}/metrics", file=sys.stderr)
    while True:
        time.sleep(3600)


def cmd_submit(args: argparse.Namespace) -> int:
    import time

    from .client import InpaintClient, RedisUnavailable
    from .schema import REFERENCE_FIELDS
    from .settings import get_settings

    try:
        request = build_request(args)
        for name in REFERENCE_FIELDS:  # local files travel inline; checked before anything is sent
            if name in request:
                request[name] = inline_local_file(name, request[name], get_settings().data_url_max_bytes)
        client = InpaintClient.from_env()
        job_id = client.submit(request, job_id=args.job_id, queue=args.queue)
    except JobError as error:
        print(json.dumps({"error": error.to_dict()}, indent=2))
        return EXIT_INVALID
    except RedisUnavailable as error:
        print(f"error: {error} (INPAINT_BROKER_URL, INPAINT_RESULT_BACKEND)", file=sys.stderr)
        return EXIT_FAILED
    print(f"job {job_id} submitted", file=sys.stderr)
    bar, deadline = ProgressBar(), time.monotonic() + args.timeout
    try:
        while True:
            status = client.status(job_id)
            if status.progress and not args.quiet:
                bar(status.progress)
            elif status.queue and not args.quiet:
                bar.waiting(status.queue)
            if status.done or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    except RedisUnavailable as error:
        print(f"\nerror: job {job_id} was submitted, then {error}", file=sys.stderr)
        return EXIT_FAILED
    if not args.quiet:
        bar.finish(status.state)
    print(status.model_dump_json(indent=2, exclude_none=True))
    if not status.done:
        print(f"timed out after {args.timeout:g} s; the job goes on (state {status.state}, job {job_id})",
              file=sys.stderr)
        return EXIT_TIMED_OUT
    if status.state == "SUCCESS":
        return 0
    return EXIT_INVALID if (status.error or {}).get("code") == "invalid_request" else EXIT_FAILED


def inline_local_file(field: str, ref: Any, max_bytes: int) -> Any:
    """A local path as a data: URL, read as `run` reads one (regular files only, at most `max_bytes`: what a worker
    takes as a data: URL); URLs (data:, s3://, https://, ...) and non-strings are left to the request."""
    if not isinstance(ref, str) or URL.match(ref):
        return ref
    from .client import content_type_of, data_url
    from .inputs import LocalFetcher

    data = LocalFetcher(max_bytes, max_bytes).fetch(ref, field)
    return data_url(data, content_type_of(data, Path(ref).name))


def cmd_up(args: argparse.Namespace) -> int:
    import importlib.util
    import signal
    import socket
    import time

    from .app import make_app
    from .client import InpaintClient
    from .stack import LocalStack, free_port

    args.image, args.mask = args.image or str(SAMPLES / "sample.png"), args.mask or str(SAMPLES / "sample-mask.png")
    if args.demo:  # before anything starts: the defaults exist only in a source checkout
        for flag, path in (("--image", args.image), ("--mask", args.mask)):
            if not Path(path).is_file():
                print(f"error: {flag} {path}: no such file (the samples come with the source checkout, not the "
                      "wheel: pass --image and --mask)", file=sys.stderr)
                return EXIT_INVALID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop what we started on SIGTERM too
    # Flower beside a stack left up (not for --demo, which stays fast); started before the worker to see its events
    flower = not args.demo and importlib.util.find_spec("flower") is not None
    if not args.demo and not flower:
        print("note: Flower is not installed (pip install flower), so the stack runs without it", file=sys.stderr)
    stack = LocalStack(flower=flower, page=not args.demo).start()
    try:
        client = InpaintClient(make_app(stack.settings(), client=True))
        node = f"local@{socket.gethostname()}"
        print(f"redis {stack.redis.url}, S3 {stack.s3.endpoint} (buckets inputs, outputs); starting worker {node} "
              f"(log: {stack.directory / 'local.log'})...", file=sys.stderr)
        metrics_port = None if args.demo else free_port()
        stack.start_worker(node, **({"INPAINT_METRICS_PORT": str(metrics_port)} if metrics_port else {})) \
            .wait_ready(client.app)
        if args.demo:
            return demo(args, stack, client)
        image, mask = (path if Path(path).is_file() else placeholder
                       for path, placeholder in ((args.image, "photo.png"), (args.mask, "mask.png")))
        print("\n" + stack.how_to_use(image, mask, args.prompt, metrics_port), file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping the stack...", file=sys.stderr)
        stack.stop()


def demo(args: argparse.Namespace, stack: Any, client: Any) -> int:
    """Upload the sample, submit it, follow it, download the result next to the input."""
    import time

    s3 = stack.s3.client()
    request = build_request(argparse.Namespace(request=None, image=None, mask=None, prompt=args.prompt,
                                               set=["seed=7", "num_inference_steps=20", *args.set]))
    for name, path in (("image", Path(args.image)), ("mask_image", Path(args.mask))):
        s3.put_object(Bucket="inputs", Key=path.name, Body=path.read_bytes())
        request[name] = f"s3://inputs/{path.name}"
    job_id = client.submit(request)
    print(f"submitted job {job_id}", file=sys.stderr)
    bar = ProgressBar()
    while not (status := client.status(job_id)).done:
        if status.progress:
            bar(status.progress)
        time.sleep(0.1)
    bar.finish(status.state)
    print(status.model_dump_json(indent=2, exclude_none=True))
    if status.state != "SUCCESS":
        return 1
    for image in status.result.images:
        bucket, key = image.location.removeprefix("s3://").split("/", 1)
        target = Path(args.image).with_name(f"{Path(args.image).stem}.inpainted-{image.index}.{key.rsplit('.', 1)[1]}")
        target.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        print(f"downloaded {image.location} to {target}", file=sys.stderr)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import TINY_MODEL_LABEL, build_tiny_model

    path = build_tiny_model(args.directory)
    print(f"wrote the {TINY_MODEL_LABEL} to {path}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import Plugins
    from .settings import Settings

    rows = Plugins(blocked=Settings().plugins_blocked).describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        source = f"{row.get('distribution', '-')} {row.get('version', '')}".strip()
        detail = ", ".join(row["hooks"]) or row.get("error", "")
        print(f"{row['name']:<14} {row['status']:<8} {row.get('kind', '-'):<10} {source:<28} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
