"""The container deployment in docker/: the compose file, its env example, the Dockerfile and the worker healthcheck.

No docker is needed: the compose file is checked against the Compose Specification's JSON schema (vendored in
tests/compose-spec.json) and resolved with the env example as `docker compose config` would; everything else reads the
files (PyYAML) or runs docker/healthcheck.py against the real stack (redis-server, worker processes).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support import box_mask, data_url, photo

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
HEALTHCHECK = DOCKER / "healthcheck.py"
COMPOSE_SCHEMA = ROOT / "tests" / "compose-spec.json"  # vendored: see the test that uses it
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
HOST = socket.gethostname()

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|_KEY", re.IGNORECASE)
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?])[^}]*)?\}")
ONLY_A_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")
URL_PASSWORD = re.compile(r"://[^/@:\s]*:([^@\s]*)@")
DOCUMENTED = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
QUOTED_SETTING = re.compile(r"""["'](INPAINT_[A-Z0-9_]+)["']""")


# --- helpers ------------------------------------------------------------------------------------------------------

def variables_read_by_code() -> set[str]:
    """INPAINT_* names that code under worker/ and plugins/ reads from the environment itself, not through Settings:
    every quoted name in a module that reads os.environ (`os.environ.get("INPAINT_WATERMARK_TEXT")`, or a constant
    such as `ENV_SECRET = "INPAINT_WEBHOOK_SECRET"` read with `os.environ.get(ENV_SECRET)`)."""
    names = set()
    for path in sorted((ROOT / "worker").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py")):
        if {"tests", "build", "__pycache__"} & set(path.relative_to(ROOT).parts):
            continue
        text = path.read_text()
        if "os.environ" in text or "getenv(" in text:
            names |= set(QUOTED_SETTING.findall(text))
    return names


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


def env_example(commented: bool = True) -> dict[str, str]:
    """NAME -> value of every variable .env.example sets, and (commented=True) of those it shows commented out."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = DOCUMENTED.match(line.strip())
        if match and (commented or not line.lstrip().startswith("#")):
            values.setdefault(match.group(1), match.group(2).strip())
    return values


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def command(service: dict) -> list[str]:
    value = service.get("command") or []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def default_of(value: str) -> str | None:
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", value)
    return match.group(1) if match else None


def seconds(duration: str) -> float:
    """A compose duration (1h5m, 35m, 2100s, 90) in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", duration):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in filter(None, (line.strip() for line in text.splitlines())):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            name = re.search(r"\s+AS\s+(\S+)$", args, re.IGNORECASE)
            current = stages.setdefault(name.group(1) if name else f"stage{len(stages)}", [])
        current.append((keyword, args))
    return stages


def last_stage() -> tuple[str, list[tuple[str, str]]]:
    return list(dockerfile_stages().items())[-1]


def values(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def user_of(instructions: list[tuple[str, str]]) -> str:
    """The stage's last USER, its ARGs resolved to their defaults, without the group."""
    users = values(instructions, "USER")
    if not users:
        return ""
    args = dict(arg.split("=", 1) for arg in values(instructions, "ARG") if "=" in arg)
    user = re.sub(r"\$\{?(\w+)\}?", lambda match: args.get(match.group(1), match.group(0)), users[-1])
    return user.split(":")[0]


def env_settings(instructions: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for args in values(instructions, "ENV"):
        for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S+)", args):
            found[name] = value.strip('"')
    return found


# --- the compose file against the Compose Specification -----------------------------------------------------------

def schema_errors(document) -> list[str]:
    """Every error of the Compose Specification's JSON schema for the document, nested ones (anyOf, oneOf) included,
    as "path: message"."""
    validator = jsonschema.Draft202012Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    found, pending = [], list(validator.iter_errors(document))
    while pending:
        error = pending.pop()
        found.append(f"{'/'.join(map(str, error.absolute_path))}: {error.message}")
        pending.extend(error.context or ())
    return sorted(found)


def env_file(path: Path) -> dict[str, str]:
    """The variables an env file sets, read as compose reads `--env-file`: comments and blank lines skipped, an
    optional `export`, quotes around a value removed, a ` #` comment after an unquoted value dropped."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()), f"{path.name}: not NAME=value: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.sub(r"\s+#.*$", "", value)
        found[name.strip()] = value
    return found


INTERPOLATION = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.DOTALL)


def resolve(env: dict[str, str]) -> tuple[dict, list[str], list[str]]:
    """compose.yaml as `docker compose --env-file FILE config` resolves it with only FILE's variables (no shell
    environment): every string value interpolated (${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, $$ for a literal $). Returns the document, the names used without a default
    that FILE does not set (compose: 'The "VAR" variable is not set'), and compose's errors for ${VAR:?...} left empty
    ('required variable VAR is missing a value: ...'), which make `config` fail."""
    unset: list[str] = []
    missing: list[str] = []

    def substitute(match: re.Match) -> str:
        if match.group(1):
            return "$"
        if match.group(3):
            name, operator, argument = match.group(3), "", ""
        else:
            braced = BRACED.fullmatch(match.group(2))
            assert braced, f"invalid interpolation format: {match.group(0)!r}"
            name, operator, argument = braced.group(1), braced.group(2) or "", braced.group(3) or ""
            assert "$" not in argument, f"nested interpolation is not handled here: {match.group(0)!r}"
        value = env.get(name)
        present = bool(value) if operator.startswith(":") else value is not None
        if operator.endswith("-"):
            return value if present else argument
        if operator.endswith("?"):
            if not present:
                missing.append(f"required variable {name} is missing a value: {argument}")
            return value or ""
        if operator.endswith("+"):
            return argument if present else ""
        if value is None:
            unset.append(name)
        return value or ""

    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return INTERPOLATION.sub(substitute, node) if isinstance(node, str) else node

    return walk(compose()), sorted(set(unset)), sorted(set(missing))


def test_compose_yaml_is_valid_under_the_compose_specification():
    """docker/compose.yaml, as written and as resolved with docker/.env.example, against the Compose Specification's
    JSON schema: the offline part of `docker compose config`, which needs a compose v2 client that CI does not have.

    tests/compose-spec.json is the compose-spec project's schema/compose-spec.json (Compose Specification, top-level
    `name`, `include`, `models`, ...), taken unmodified from the PyPI package check-jsonschema 0.39.0 (its
    check_jsonschema/builtin_schemas/vendor/compose-spec.json, vendored there for its check-compose-spec hook).
    Licence: Apache-2.0, the compose-spec project's; its text is tests/compose-spec.LICENSE (that package's
    vendor/licenses/LICENSE.compose-spec). Not patched: the sha256 below is the one check-jsonschema 0.39.0 records
    (vendor/sha256/compose-spec.sha256). To update, copy both files from a newer check-jsonschema and change the hash.
    """
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "tests/compose-spec.json changed: record where it came from"
    assert schema_errors(compose()) == []
    resolved, _, missing = resolve(env_file(ENV_EXAMPLE))
    assert missing == [] and schema_errors(resolved) == []


@pytest.mark.parametrize("old, new, named", [
    ("  stop_grace_period:", "  stop_grace_periode:", "stop_grace_periode"),  # in x-worker: reaches the workers by <<
    ("      retries: 5", "      retrys: 5", "retrys"),  # redis's healthcheck
    ("        condition: service_healthy", "        condition: service_healty", "service_healty"),  # not an enum value
    ("\nvolumes:\n", "\nvolume:\n", "volume"),  # a top-level key
    ("    profiles: [per-gpu]", "    profiles: per-gpu", "per-gpu"),  # a string where a list goes
], ids=["service-key", "healthcheck-key", "enum-value", "top-level-key", "type"])
def test_the_schema_check_fails_on_a_broken_compose_file(old, new, named):
    text = COMPOSE.read_text()
    assert old in text, f"compose.yaml changed: pick another key to break than {old!r}"
    errors = schema_errors(yaml.safe_load(text.replace(old, new, 1)))
    assert errors and any(repr(named) in error for error in errors), errors


def test_compose_resolves_with_the_example_env_file():
    # what `docker compose --env-file docker/.env.example config` printed and the operator reads
    resolved, unset, missing = resolve(env_file(ENV_EXAMPLE))
    assert missing == []
    assert {"redis", "minio", "createbuckets", "flower", "worker"} <= set(resolved["services"])
    assert unset == [], f"a variable compose uses is missing from .env.example: {unset}"
    worker = resolved["services"]["worker"]
    assert worker["environment"]["INPAINT_BROKER_URL"] == "redis://:change-me-redis-password@redis:6379/0"
    assert worker["environment"]["INPAINT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert seconds(worker["stop_grace_period"]) >= 35 * 60
    # $$ reaches the container's shell as $
    assert '"$INPAINT_BROKER_URL"' in resolved["services"]["flower"]["command"][2]


REQUIRED = ("REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH", "INPAINT_OUTPUT_BUCKET")


def test_compose_refuses_an_env_file_without_the_secrets(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    _, _, missing = resolve(env_file(empty))
    assert missing, "`config` would succeed without an env file"
    assert all(error.startswith("required variable ") and " is missing a value: " in error for error in missing)
    named = {error.split()[2] for error in missing}
    assert set(REQUIRED) <= named, missing
    # each one alone, unset or set empty, is refused too
    example = env_file(ENV_EXAMPLE)
    for name in REQUIRED:
        for env in ({key: value for key, value in example.items() if key != name}, {**example, name: ""}):
            _, _, missing = resolve(env)
            assert [error.split()[2] for error in missing] == [name], (name, missing)


# --- the compose file, read ---------------------------------------------------------------------------------------

def test_redis_requires_a_password_and_keeps_an_append_only_file():
    redis = services()["redis"]
    args = command(redis)
    assert args[0] == "redis-server"
    password = args[args.index("--requirepass") + 1]
    assert REFERENCE.fullmatch(password) and REFERENCE.fullmatch(password).group(1) == "REDIS_PASSWORD", password
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"]), "the append-only file needs a volume"
    assert redis["restart"] == "unless-stopped" and redis.get("healthcheck")
    # workers and Flower log in with that same password
    broker = compose()["x-broker-url"]
    assert broker.startswith("redis://:${REDIS_PASSWORD}@") and broker.endswith("/0")
    assert "${REDIS_ADDRESS:-redis:6379}" in broker
    for name in ("worker", "flower"):
        assert environment(services()[name])["INPAINT_BROKER_URL"] == broker


def test_the_worker_reserves_every_nvidia_gpu_and_per_gpu_services_pin_one_each():
    all_services = services()
    worker = all_services["worker"]
    [devices] = gpu_devices(worker)
    assert devices["driver"] == "nvidia" and devices["count"] == "all" and "gpu" in devices["capabilities"]
    assert "profiles" not in worker, "the all-GPU worker starts with a plain `up`"
    assert "command" not in worker, "the image's command, `inpaint-worker launch`, pins one worker per GPU"
    pinned = {name: service for name, service in all_services.items() if name.startswith("worker-gpu")}
    assert len(pinned) >= 2
    for index, (name, service) in enumerate(sorted(pinned.items())):
        [device] = gpu_devices(service)
        assert device["driver"] == "nvidia" and device["device_ids"] == [str(index)] and "count" not in device
        assert service["profiles"] == ["per-gpu"], f"{name} must not start next to the all-GPU worker by default"
        assert service["hostname"] != worker["hostname"], "two containers with one node name confuse Celery"
        assert environment(service) == environment(worker) and service["image"] == worker["image"]
    for service in (worker, *pinned.values()):
        assert service["restart"] == "unless-stopped" and service["init"] is True
        assert any(volume.endswith(":/models") for volume in service["volumes"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"


def test_no_secret_is_written_in_compose_yaml():
    document = compose()
    for name, service in document["services"].items():
        env = {**environment(service), **(service.get("build", {}).get("args") or {})}
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert value is None or ONLY_A_REFERENCE.match(str(value)), f"{name}: {key} must be a ${{VAR}}"
        words = command(service)
        for flag in ("--requirepass", "--password", "--pass"):
            if flag in words:
                assert ONLY_A_REFERENCE.match(words[words.index(flag) + 1]), f"{name}: {flag} written in the command"
    for text in strings(document):
        for password in URL_PASSWORD.findall(text):
            assert ONLY_A_REFERENCE.match(password), f"a password written into a URL: {text}"
    assert not [text for text in strings(document) if "change-me" in text], "compose.yaml holds a value of .env"


def test_every_variable_compose_uses_is_documented_in_env_example():
    raw = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    unescaped = raw.replace("$$", "")
    assert not re.findall(r"\$(?!\{)[A-Za-z_]", unescaped), "use ${VAR} (or $$VAR for the container's shell)"
    used = set(REFERENCE.findall(unescaped))
    # names with no value are passed on from the env file when it sets them: documented as well
    for service in services().values():
        used |= {key for key, value in environment(service).items() if value is None}
        used |= {key for key, value in (service.get("build", {}).get("args") or {}).items() if value is None}
    documented = set(env_example())
    assert {"REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH", "INPAINT_OUTPUT_BUCKET",
            "INPAINT_MODEL", "INPAINT_MAX_DEADLINE_S", "INPAINT_VISIBILITY_TIMEOUT_S", "HF_CACHE_DIR"} <= used
    assert sorted(used - documented) == [], "used by compose.yaml but not in .env.example"
    assert sorted(documented - used) == [], "in .env.example but compose.yaml never reads it"


def test_env_example_placeholders_are_obviously_not_secrets():
    example = env_example()
    for name, value in example.items():
        if SECRET_NAME.search(name) and value:
            assert "change-me" in value, f"{name}={value} looks like a real secret"
    assert example["FLOWER_BASIC_AUTH"].count(":") == 1 and all(example["FLOWER_BASIC_AUTH"].split(":"))
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", example["REDIS_PASSWORD"]), "the password goes into a URL unescaped"
    assert len(example["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses shorter root passwords"
    for name in ("REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert name in env_example(commented=False), f"{name} must be set, not commented out"


def test_the_example_worker_settings_are_valid_and_every_setting_can_be_set_from_the_env_file(monkeypatch):
    from worker.settings import Settings

    example = {name: value for name, value in env_example().items() if name.startswith("INPAINT_")}
    known = {f"INPAINT_{field.upper()}" for field in Settings.model_fields} | variables_read_by_code()
    assert sorted(set(example) - known) == [], "not a worker setting (README, Configuration) nor read by a plugin"
    passed = set(environment(services()["worker"]))
    configurable = {f"INPAINT_{field.upper()}" for field in Settings.model_fields} - {"INPAINT_CACHE_DIR"}
    assert sorted(configurable - passed) == [], "settings the compose file does not pass to the workers"
    for name in [name for name in os.environ if name.startswith("INPAINT_")]:
        monkeypatch.delenv(name)
    for name, value in example.items():
        if value:
            monkeypatch.setenv(name, value)
    settings = Settings()  # the worker's own validation, e.g. visibility timeout > deadline cap + uploads
    assert settings.model == "Qwen/Qwen-Image"
    assert settings.output_bucket == env_example()["INPAINT_OUTPUT_BUCKET"]


def test_compose_passes_the_workers_every_variable_their_plugins_read_from_the_environment():
    # compose gives a container only the variables its environment names: one missing from the list is silently
    # ignored when the operator sets it in docker/.env (a watermark that never shows, unsigned webhooks)
    read = variables_read_by_code()
    assert {"INPAINT_WATERMARK_TEXT", "INPAINT_WEBHOOK_SECRET"} <= read, "the scan finds nothing"
    for name in ("worker", "worker-gpu0"):
        passed = set(environment(services()[name]))
        assert sorted(read - passed) == [], f"read by the workers' code but not passed to {name} by compose.yaml"


def test_the_stop_grace_period_covers_the_longest_job_so_upgrades_shut_down_warmly():
    from worker.settings import Settings

    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    grace = compose()["x-worker"]["stop_grace_period"]
    assert REFERENCE.fullmatch(grace).group(1) == "WORKER_STOP_GRACE_PERIOD"
    longest = defaults["max_deadline_s"] + defaults["deadline_margin_s"]  # a job may overrun its deadline this much
    assert seconds(default_of(grace)) >= longest, "compose's default grace vs the worker's default deadline"
    example = env_example()
    longest = float(example["INPAINT_MAX_DEADLINE_S"]) + float(example["INPAINT_DEADLINE_MARGIN_S"])
    assert seconds(example["WORKER_STOP_GRACE_PERIOD"]) >= longest, "the example's grace vs its deadline"
    for name in ("worker", "worker-gpu0"):
        assert services()[name]["stop_grace_period"] == grace


def test_buckets_are_created_at_start_before_any_worker_runs():
    all_services = services()
    minio = all_services["minio"]
    assert environment(minio)["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD")
    assert any(volume.endswith(":/data") for volume in minio["volumes"]) and minio.get("healthcheck")
    create = all_services["createbuckets"]
    assert create["image"].startswith("${MC_IMAGE:-minio/mc")
    assert create["depends_on"]["minio"]["condition"] == "service_healthy"
    script = "\n".join(command(create))
    assert "mc mb --ignore-existing" in script and "until mc alias set" in script
    assert "$$INPAINT_OUTPUT_BUCKET" in script and "$$INPAINT_INPUT_BUCKETS" in script
    assert str(create.get("restart")) in {"no", "False"}
    worker = environment(all_services["worker"])
    assert worker["AWS_ACCESS_KEY_ID"] == "${MINIO_ROOT_USER}"
    assert worker["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD}"
    assert worker["INPAINT_S3_ENDPOINT_URL"] == "${INPAINT_S3_ENDPOINT_URL:-http://minio:9000}"


def test_the_bucket_script_creates_the_output_and_every_input_bucket(tmp_path):
    # the createbuckets script, run by sh with a fake `mc` that records its arguments
    script = "\n".join(command(services()["createbuckets"])).replace("$$", "$")
    (tmp_path / "mc").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    (tmp_path / "mc").chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p",
           "INPAINT_OUTPUT_BUCKET": "results", "INPAINT_INPUT_BUCKETS": "uploads, more ,"}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "alias set local http://minio:9000 u p"
    assert calls[1:] == [f"mb --ignore-existing local/{bucket}" for bucket in ("results", "uploads", "more")]


def test_flower_runs_the_repository_flower_cfg_with_basic_auth_from_the_env_file():
    flower = services()["flower"]
    assert command(flower)[:2] == ["sh", "-c"]
    assert command(flower)[2] == 'exec celery --broker "$$INPAINT_BROKER_URL" flower --conf=/app/flower.cfg'
    assert environment(flower)["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH")
    assert any(str(port).endswith(":5555") for port in flower["ports"])
    assert any(volume.endswith(":/data") for volume in flower["volumes"]) and environment(flower)["FLOWER_DB"]
    assert flower["build"]["target"] == "flower" and flower["restart"] == "unless-stopped"
    stage = dockerfile_stages()["flower"]
    assert "flower.cfg /app/flower.cfg" in values(stage, "COPY")
    assert (ROOT / "flower.cfg").is_file(), "the image copies the repository's flower.cfg"
    assert not any("torch" in run for run in values(stage, "RUN")), "Flower needs no torch"
    assert env_settings(stage)["FLOWER_DB"] == environment(flower)["FLOWER_DB"]
    # flower.cfg listens on loopback unless told: inside a container, every interface (the port mapping decides)
    assert env_settings(stage)["FLOWER_ADDRESS"] == environment(flower)["FLOWER_ADDRESS"] == "0.0.0.0"
    assert user_of(stage) not in {"root", "0", ""}


# --- the Dockerfile -----------------------------------------------------------------------------------------------

def test_the_worker_image_runs_as_non_root_with_a_healthcheck_and_the_model_cache_on_a_volume():
    name, stage = last_stage()
    assert name == "worker", "the default target is the worker"
    base = values(stage, "FROM")[0]
    assert base.startswith("${CUDA_IMAGE}")
    cuda_image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert cuda_image.startswith("nvidia/cuda:") and "-base-" in cuda_image
    assert user_of(stage) not in {"root", "0", ""}, "the worker must not run as root"
    assert any('useradd --uid "$UID"' in run for run in values(stage, "RUN"))
    [healthcheck] = values(stage, "HEALTHCHECK")
    assert "NONE" not in healthcheck and '"/app/healthcheck.py"' in healthcheck
    assert "docker/healthcheck.py /app/healthcheck.py" in values(stage, "COPY")
    assert "--start-period" in healthcheck, "the first model download must not count as unhealthy"
    assert values(stage, "VOLUME") == ["/models"]
    env = env_settings(stage)
    assert env["HF_HOME"] == "/models" and env["INPAINT_MODEL"] == "Qwen/Qwen-Image"
    assert env["INPAINT_CACHE_DIR"].startswith("/models/")
    assert values(stage, "ENTRYPOINT") == ['["inpaint-worker"]'] and values(stage, "CMD") == ['["launch"]']
    assert values(stage, "STOPSIGNAL") == ["SIGTERM"]


def test_the_worker_image_installs_the_worker_extra_over_torch_from_the_cuda_index():
    build = dockerfile_stages()["worker-build"]
    runs = values(build, "RUN")
    torch = next(i for i, run in enumerate(runs) if '--index-url "$TORCH_INDEX_URL"' in run)
    extra = next(i for i, run in enumerate(runs) if re.search(r"""pip install ["']?\.\[worker\]""", run))
    assert torch < extra, "torch from the CUDA index first, so the extra does not pull another build"
    assert any(arg.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for arg in values(build, "ARG"))
    assert "--from=worker-build /opt/venv /opt/venv" in values(last_stage()[1], "COPY")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(prefix, candidate) and prefix.count("/") >= candidate.count("/")
               for prefix in prefixes for candidate in candidates):
            ignored = not negated
    return ignored


def test_the_build_context_is_what_the_dockerfile_copies_and_never_the_venv():
    ignore = DOCKER / "Dockerfile.dockerignore"  # BuildKit's ignore file for docker/Dockerfile
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and line[0] != "#"]
    sources = [source for args in values([i for s in dockerfile_stages().values() for i in s], "COPY")
               if not args.startswith("--from") for source in args.split()[:-1]]
    assert sources, "no COPY found"
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [
            p for p in path.rglob("*.py")
            if not any(part in {"__pycache__", "build"} or part.endswith(".egg-info") for part in p.parts)]
        for file in files[:50]:
            assert not dockerignored(file.relative_to(ROOT).as_posix(), patterns), f"{file} left out of the context"
    for unwanted in (".venv/bin/python", ".git/HEAD", "out/local/0.png", "worker/__pycache__/app.cpython-311.pyc",
                     "plugins/webhook/build/lib/inpaint_webhook.py", "qwen_inpaint_worker.egg-info/PKG-INFO",
                     "docker/.env", "tests/test_job.py"):
        assert dockerignored(unwanted, patterns), f"{unwanted} would be sent to the builder"


# --- docker/healthcheck.py against real workers ------------------------------------------------------------------

def healthcheck(env: dict[str, str], *args: str) -> tuple[int, str]:
    """docker/healthcheck.py as the container runs it; its exit status and what it printed."""
    done = subprocess.run([sys.executable, str(HEALTHCHECK), "--timeout", "3", *args], capture_output=True,
                          text=True, timeout=90, cwd=ROOT, env={**os.environ, **env})
    return done.returncode, (done.stdout + done.stderr).strip()


@pytest.fixture(scope="module")
def local_workers(stack, worker_env):
    """Two workers named as `launch` names them in a container, on a queue of their own: gpu0@host and cpu0@host."""
    from worker.app import make_app

    app = make_app(stack.settings(queue="healthcheck"))
    workers = [stack.start_worker(f"{kind}0@{HOST}", INPAINT_QUEUE="healthcheck", **worker_env)
               for kind in ("gpu", "cpu")]
    try:
        for process in workers:
            process.wait_ready(app)
        yield app
    finally:
        for process in workers:
            process.stop()


@pytest.mark.slow
def test_healthcheck_wants_an_answer_from_every_gpu_worker_of_this_host(stack, local_workers):
    code, out = healthcheck(stack.env(CUDA_VISIBLE_DEVICES="0"))
    assert code == 0 and out == f"healthy: gpu0@{HOST} answered", out
    code, out = healthcheck(stack.env(CUDA_VISIBLE_DEVICES="0,1"))
    assert code == 1 and out == f"unhealthy: no answer within 3 s from gpu1@{HOST}", out
    # another host's workers do not make this one healthy
    code, out = healthcheck(stack.env(CUDA_VISIBLE_DEVICES="0"), "--hostname", "elsewhere")
    assert code == 1 and out == "unhealthy: no answer within 3 s from gpu0@elsewhere", out


@pytest.mark.slow
def test_healthcheck_without_gpus_wants_a_cpu_worker_of_this_host(stack, local_workers):
    code, out = healthcheck(stack.env(CUDA_VISIBLE_DEVICES=""))
    assert code == 0 and out == f"healthy: cpu0@{HOST} answered", out


@pytest.mark.slow
def test_healthcheck_stays_healthy_while_a_worker_runs_a_long_job(stack, local_workers):
    from worker.client import InpaintClient

    client = InpaintClient(local_workers)
    job_id = client.submit({"prompt": "a pear", "image": data_url(photo()), "mask_image": data_url(box_mask()),
                            "num_inference_steps": 40, "strength": 1.0, "plugins": {"testkit": {"step_s": 0.2}}})
    try:
        deadline = time.monotonic() + 60
        while not ((progress := client.status(job_id).progress) and progress.stage == "denoising"):
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        results = [healthcheck(stack.env(CUDA_VISIBLE_DEVICES=gpus)) for gpus in ("0", "")]
        assert client.status(job_id).state == "PROGRESS", "the job ended before the checks: make it longer"
        assert [code for code, _ in results] == [0, 0], results
    finally:
        client.cancel(job_id)
        client.wait(job_id, timeout=60)


@pytest.mark.slow
def test_healthcheck_is_unhealthy_without_the_broker_and_does_not_print_its_password():
    code, out = healthcheck({"CUDA_VISIBLE_DEVICES": "0", "INPAINT_BROKER_URL": "redis://:not-a-real-password@127.0.0.1:1/0"})
    assert code == 1 and out.startswith("unhealthy: cannot ping the workers"), out
    assert "not-a-real-password" not in out
