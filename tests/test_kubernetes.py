"""The Kubernetes example in deploy/kubernetes/: its manifests against Kubernetes' and KEDA's schemas and the settings.

No cluster is needed. Core kinds are validated with kubernetes-validate (the Kubernetes OpenAPI schemas as JSON
schemas, strict: an unknown field is an error, as `kubectl apply`'s strict field validation makes it). KEDA's kinds
against the openAPIV3Schema of KEDA's own CRDs, vendored in tests/keda-crds/, with unknown fields refused as the API
server refuses them for a structural schema; the redis trigger's metadata and authentication parameters against the
names KEDA's redis scaler reads. The environment the pods get is fed to the worker's `Settings`, so its own checks run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.test_docker import DOCKERFILE, HEALTHCHECK, dockerfile_stages, last_stage, values, variables_read_by_code

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
PRIORITIES = KUBERNETES / "priorities" / "scaledobject.yaml"
SECRET_EXAMPLE = KUBERNETES / "secret.env.example"
KEDA_CRDS = ROOT / "tests" / "keda-crds"
# KEDA v2.20.2's config/crd/bases/keda.sh_<plural>.yaml, unchanged (see test_the_vendored_keda_crds_are_keda_s_own)
KEDA_CRD_SHA256 = {
    "scaledobjects": "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80",
    "triggerauthentications": "275307b4cb19ca8f0f506a879282aa4c67587ac16ec757f494d6585c5c185d65",
}
# the oldest Kubernetes still commonly run, and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# What KEDA v2.20.2's redis scaler reads (pkg/scalers/redis_scaler.go, the `keda:"name=..."` tags of redisMetadata):
# from a trigger's metadata, and from a TriggerAuthentication's parameters
REDIS_METADATA = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                  "sentinelUsername", "sentinelPassword", "sentinelMaster", "unsafeSsl", "listLength",
                  "activationListLength", "listName", "databaseIndex", "enableTLS"}
REDIS_AUTH_PARAMETERS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                         "sentinelUsername", "sentinelPassword", "sentinelMaster", "cert", "Cert", "key",
                         "keyPassword", "ca", "tls"}
NAME = "qwen-inpaint-worker"


# --- helpers ------------------------------------------------------------------------------------------------------

def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in [*MANIFESTS, PRIORITIES] for doc in documents(path)]


def the(kind: str, path: Path | None = None) -> dict:
    """The one document of this kind in the file, or in the manifests `kubectl apply -f deploy/kubernetes/` applies."""
    found = documents(path) if path else [doc for manifest in MANIFESTS for doc in documents(manifest)]
    [doc] = [doc for doc in found if doc["kind"] == kind]
    return doc


def worker_container() -> dict:
    [container] = the("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def secret_example(commented: bool = False) -> dict[str, str]:
    """What `kubectl create secret generic --from-env-file` makes of the example (and, commented=True, the keys it
    shows commented out)."""
    found = {}
    for line in SECRET_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line.strip())
        if match and (commented or not match.group(1)):
            found[match.group(2)] = match.group(3)
    return found


def pod_environment(container: dict) -> dict[str, str]:
    """The variables the container gets, with the ConfigMap's values and the Secret example's: envFrom first, env
    over it, an optional key the example leaves out not set (as the kubelet does)."""
    configmaps = {doc["metadata"]["name"]: doc["data"] for _, doc in all_documents() if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    secret = secret_example()
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[var["name"]] = var["value"]
        elif ref["key"] in secret:
            env[var["name"]] = secret[ref["key"]]
    return env


def settings_of(env: dict[str, str], monkeypatch):
    from worker.settings import Settings

    for name in [name for name in os.environ if name.startswith("INPAINT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def crd_schema(plural: str) -> dict:
    """The CRD's openAPIV3Schema, with unknown fields refused wherever the API server prunes or refuses them: every
    object that lists its properties and neither allows more nor preserves unknown fields (metadata is ObjectMeta,
    checked by the API server itself)."""
    [crd] = documents(KEDA_CRDS / f"keda.sh_{plural}.yaml")
    [version] = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def keda_errors(doc: dict) -> list[str]:
    plural = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}[doc["kind"]]
    validator = jsonschema.Draft7Validator(crd_schema(plural))
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if doc["apiVersion"] != "keda.sh/v1alpha1":
        found.append(f"apiVersion {doc['apiVersion']}: KEDA serves keda.sh/v1alpha1")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc.get("metadata", {}).get("name", "")):
        found.append("metadata.name: not a DNS label")
    for i, trigger in enumerate(doc.get("spec", {}).get("triggers", [])):
        if trigger.get("type") != "redis":
            found.append(f"spec/triggers/{i}: not a redis trigger")
        found += [f"spec/triggers/{i}/metadata/{key}: not read by KEDA's redis scaler"
                  for key in sorted(set(trigger.get("metadata", {})) - REDIS_METADATA)]
    for i, ref in enumerate(doc.get("spec", {}).get("secretTargetRef", [])):
        if ref.get("parameter") not in REDIS_AUTH_PARAMETERS:
            found.append(f"spec/secretTargetRef/{i}/parameter: {ref.get('parameter')!r} not read by the redis scaler")
    return found


def validate(doc: dict) -> None:
    """Raises if the document is not valid: Kubernetes' schemas for core kinds, KEDA's for KEDA's."""
    if doc["apiVersion"].startswith("keda.sh/"):
        errors = keda_errors(doc)
        if errors:
            raise AssertionError("; ".join(errors))
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


# --- the manifests against the schemas ------------------------------------------------------------------------------

def test_the_example_has_every_manifest_the_readme_applies():
    kinds = sorted((path.relative_to(KUBERNETES).as_posix(), doc["kind"]) for path, doc in all_documents())
    assert kinds == [("configmap.yaml", "ConfigMap"), ("deployment.yaml", "Deployment"),
                     ("model-cache.yaml", "Job"), ("model-cache.yaml", "PersistentVolumeClaim"),
                     ("priorities/scaledobject.yaml", "ScaledObject"), ("scaledobject.yaml", "ScaledObject"),
                     ("scaledobject.yaml", "TriggerAuthentication")]
    readme = (KUBERNETES / "README.md").read_text()
    for path in [*MANIFESTS, PRIORITIES, SECRET_EXAMPLE]:
        assert path.relative_to(KUBERNETES).as_posix() in readme, f"{path.name} is not explained in the README"
    assert "not been run on a cluster" in readme


@pytest.mark.parametrize("path, doc", all_documents(),
                         ids=[f"{p.relative_to(KUBERNETES)}:{d['kind']}" for p, d in all_documents()])
def test_every_manifest_is_valid_against_its_schema(path, doc):
    validate(doc)


@pytest.mark.parametrize("manifest, field, misspelled", [
    ("deployment.yaml", "terminationGracePeriodSeconds:", "terminationGracePeriodSecond:"),
    ("deployment.yaml", "secretKeyRef:", "secretRef:"),
    ("configmap.yaml", "\ndata:", "\ndate:"),
    ("model-cache.yaml", "backoffLimit:", "backOffLimit:"),
    ("scaledobject.yaml", "minReplicaCount:", "minReplicasCount:"),
    ("scaledobject.yaml", "stabilizationWindowSeconds:", "stabilisationWindowSeconds:"),
    ("scaledobject.yaml", "secretTargetRef:", "secretTargetRefs:"),
    ("scaledobject.yaml", "listName:", "listname:"),
    ("scaledobject.yaml", "- parameter: address", "- parameter: adress"),
])
def test_a_misspelled_field_fails_validation(tmp_path, manifest, field, misspelled):
    text = (KUBERNETES / manifest).read_text()
    assert field in text
    broken = tmp_path / manifest
    broken.write_text(text.replace(field, misspelled, 1))
    failures = []
    for doc in documents(broken):
        try:
            validate(doc)
        except (AssertionError, jsonschema.ValidationError) as error:
            failures.append(str(error))
    assert failures, f"{misspelled} passed validation"


def test_the_vendored_keda_crds_are_keda_s_own():
    """tests/keda-crds/ holds config/crd/bases/keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml of
    kedacore/keda at tag v2.20.2, unchanged, and KEDA's LICENSE (Apache-2.0) from the same tag. To update, copy the
    files of a newer tag and change the hashes and, if the redis scaler changed, REDIS_METADATA above."""
    for plural, digest in KEDA_CRD_SHA256.items():
        data = (KEDA_CRDS / f"keda.sh_{plural}.yaml").read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"keda.sh_{plural}.yaml changed: record where it came from"
    assert "Apache License" in (KEDA_CRDS / "LICENSE").read_text()
    assert crd_schema("scaledobjects")["properties"]["spec"]["additionalProperties"] is False


# --- the manifests against the worker's settings --------------------------------------------------------------------

def test_every_inpaint_variable_the_pods_get_is_a_setting_or_read_by_a_plugin(monkeypatch):
    from worker.settings import Settings

    known = {f"INPAINT_{field.upper()}" for field in Settings.model_fields} | variables_read_by_code()
    for _, doc in all_documents():
        if doc["kind"] == "ConfigMap":
            names = set(doc["data"])
        elif doc["kind"] in {"Deployment", "Job"}:
            names = {var["name"] for c in doc["spec"]["template"]["spec"]["containers"] for var in c.get("env", [])}
        else:
            continue
        unknown = sorted(name for name in names if name.startswith("INPAINT_") and name not in known)
        assert unknown == [], f"{doc['kind']}: not a worker setting (README.md, Configuration) nor read by a plugin"
    settings = settings_of(pod_environment(worker_container()), monkeypatch)  # the worker's own validation
    assert settings.model == "Qwen/Qwen-Image" and settings.output_bucket == "inpaint-results"
    assert settings.metrics_address == "0.0.0.0" and settings.metrics_port == 9100
    assert worker_container()["ports"] == [{"name": "metrics", "containerPort": settings.metrics_port}]


def test_secrets_come_from_the_secret_and_nothing_secret_is_in_a_manifest():
    secret_names = {"INPAINT_BROKER_URL", "INPAINT_RESULT_BACKEND", "INPAINT_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}
    env = {var["name"]: var for var in worker_container()["env"]}
    assert secret_names <= set(env)
    example, shown = secret_example(), secret_example(commented=True)
    for name in secret_names:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == NAME
        assert ref["key"] in (shown if ref.get("optional") else example), f"{ref['key']}: not in secret.env.example"
    configmap = the("ConfigMap")["data"]
    assert not secret_names & set(configmap)
    for path in [*MANIFESTS, PRIORITIES]:
        text = path.read_text()
        assert not re.search(r"://[^/@\s]*:[^@\s]*@", text), f"{path.name}: a URL with a password"
        assert "change-me" not in text and "kind: Secret" not in text, f"{path.name}: secrets go in the Secret"
    assert all(value.startswith(("change-me", "redis://", "https://", "redis.")) for value in example.values())


def test_the_grace_period_outlasts_the_longest_job_so_scale_in_and_rollouts_shut_down_warmly(monkeypatch):
    pod = the("Deployment")["spec"]["template"]["spec"]
    settings = settings_of(pod_environment(worker_container()), monkeypatch)
    longest = settings.max_deadline_s + settings.deadline_margin_s  # a job may overrun its deadline this much
    assert pod["terminationGracePeriodSeconds"] > longest
    assert settings.visibility_timeout_s > longest  # what the worker itself enforces; set explicitly in the ConfigMap
    configmap = the("ConfigMap")["data"]
    assert {"INPAINT_MAX_DEADLINE_S", "INPAINT_DEADLINE_MARGIN_S", "INPAINT_VISIBILITY_TIMEOUT_S"} <= set(configmap)
    # with the worker's defaults too, should an operator remove the ConfigMap's values
    from worker.settings import Settings

    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert pod["terminationGracePeriodSeconds"] > defaults["max_deadline_s"] + defaults["deadline_margin_s"]
    assert the("Deployment")["spec"]["progressDeadlineSeconds"] > pod["terminationGracePeriodSeconds"]


def test_one_gpu_per_pod_running_the_images_own_launch_command():
    deployment = the("Deployment")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count: an apply would reset it"
    pod = deployment["spec"]["template"]["spec"]
    container = worker_container()
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "command" not in container and container.get("args", ["launch"]) == ["launch"]
    assert values(last_stage()[1], "ENTRYPOINT") == ['["inpaint-worker"]']
    assert "CUDA_VISIBLE_DEVICES" not in pod_environment(container), "launch pins the pod's one GPU itself"
    assert pod["enableServiceLinks"] is False, "a Service named inpaint-... would set INPAINT_..._PORT variables"
    uid = re.search(r"^ARG UID=(\d+)$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["runAsNonRoot"] is True
    [mount] = container["volumeMounts"]
    assert mount["mountPath"] == "/models" == dict(
        re.findall(r"(\w+)=(\S+)", " ".join(values(last_stage()[1], "ENV"))))["HF_HOME"]
    [volume] = pod["volumes"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim == the("PersistentVolumeClaim")["metadata"]["name"]
    job = the("Job")["spec"]["template"]["spec"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert job["containers"][0]["image"] == container["image"]


def test_the_probes_run_the_images_healthcheck_with_time_for_its_ping():
    stage = dockerfile_stages()["worker"]
    [healthcheck] = values(stage, "HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    timeout = float(re.search(r'"--timeout", type=float, default=([\d.]+)', HEALTHCHECK.read_text()).group(1))
    container = worker_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == command, probe
        assert container[probe]["timeoutSeconds"] > timeout, f"{probe}: the ping alone may take {timeout:g} s"
    startup = container["startupProbe"]
    start_period = re.search(r"--start-period=(\d+)m", healthcheck).group(1)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(start_period) * 60, "the first model load"


# --- KEDA against the queue ------------------------------------------------------------------------------------------

def test_keda_scales_the_deployment_on_the_workers_queue_with_the_workers_redis(monkeypatch):
    scaled = the("ScaledObject", KUBERNETES / "scaledobject.yaml")
    auth = the("TriggerAuthentication")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == the("Deployment")["metadata"]["name"]
    assert "kind" not in spec["scaleTargetRef"] or spec["scaleTargetRef"]["kind"] == "Deployment"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    settings = settings_of(pod_environment(worker_container()), monkeypatch)
    [trigger] = spec["triggers"]
    assert trigger["metadata"]["listName"] == settings.queue
    assert int(trigger["metadata"]["listLength"]) >= 1
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert {ref["name"] for ref in refs.values()} == {NAME}
    # the Secret's address and password are the broker URL's, and its database the trigger's
    secret, broker = secret_example(), urlsplit(settings.broker_url)
    assert secret[refs["address"]["key"]] == f"{broker.hostname}:{broker.port}"
    assert secret[refs["password"]["key"]] == broker.password
    assert trigger["metadata"]["databaseIndex"] == (broker.path.strip("/") or "0")
    assert trigger["metadata"]["enableTLS"] == str(broker.scheme == "rediss").lower()
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= settings.max_deadline_s, "a busy pod is not in the list"


def priority_list(queue: str, priority: int, steps: list[int]) -> str:
    """The Redis list kombu's Redis transport puts a message of this priority in (Channel._q_for_pri)."""
    from kombu.transport.redis import Channel

    channel = SimpleNamespace(sep=Channel.sep, priority_steps=steps)
    channel.priority = lambda n: Channel.priority(channel, n)
    return Channel._q_for_pri(channel, queue, priority)


def test_the_priority_variant_reads_every_list_kombu_keeps_the_queue_in(monkeypatch):
    from kombu.transport.redis import PRIORITY_STEPS

    from worker.app import make_app

    settings = settings_of(pod_environment(worker_container()), monkeypatch)
    steps = make_app(settings).conf.broker_transport_options.get("priority_steps", PRIORITY_STEPS)
    expected = [priority_list(settings.queue, step, steps) for step in steps]
    assert expected[0] == settings.queue and expected[1] == f"{settings.queue}\x06\x16{steps[1]}"
    plain, variant = the("ScaledObject", KUBERNETES / "scaledobject.yaml"), the("ScaledObject", PRIORITIES)
    triggers = variant["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == expected, "one trigger per priority list, in step order"
    modifiers = variant["spec"]["advanced"]["scalingModifiers"]
    assert sorted(modifiers["formula"].split(" + ")) == sorted(t["name"] for t in triggers), "the sum of the lists"
    [plain_trigger] = plain["spec"]["triggers"]
    assert modifiers["target"] == plain_trigger["metadata"]["listLength"]
    ignore = {"listName", "activationListLength"}  # the variant's activation is scalingModifiers.activationTarget
    for trigger in triggers:  # the same Redis, database and TLS as the plain one
        assert {k: v for k, v in trigger["metadata"].items() if k not in ignore} == \
            {k: v for k, v in plain_trigger["metadata"].items() if k not in ignore}
        assert trigger["authenticationRef"] == plain_trigger["authenticationRef"]
    # it replaces the plain one (same name) and scales the same way otherwise
    assert variant["metadata"] == plain["metadata"]
    same = ("scaleTargetRef", "pollingInterval", "minReplicaCount", "maxReplicaCount", "cooldownPeriod")
    assert {k: variant["spec"][k] for k in same} == {k: plain["spec"][k] for k in same}
    assert variant["spec"]["advanced"]["horizontalPodAutoscalerConfig"] == \
        plain["spec"]["advanced"]["horizontalPodAutoscalerConfig"]


def test_the_main_readme_links_the_example():
    readme = (ROOT / "README.md").read_text()
    assert "deploy/kubernetes/README.md" in readme
