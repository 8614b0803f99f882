"""The deployment files in ``deploy/`` are valid and agree with each other and with chipflow.

No docker, no cluster, no network: the Kubernetes manifests are checked against the JSON schemas
that ``kubernetes-validate`` bundles (strict: unknown fields are errors), the DaskCluster custom
resource by hand plus its pod specs as ``v1`` Pods, the CronJob's command line with chipflow's
real click CLI, and the Dockerfile by reading it.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import shlex
import socket
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import chipflow.cli
from chipflow.config import make_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
#: The newest 1.2x release the schemas cover, and the newest they cover at all.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CORE_KINDS = {"ConfigMap", "Secret", "CronJob"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to reach the network (schemas must come from the package)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load_manifests() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every document of ``deploy/k8s/*.yaml`` by kind (each kind once), and its file name."""
    docs: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in docs, f"{path.name}: a second {doc['kind']}"
                docs[doc["kind"]], files[doc["kind"]] = doc, path.name
    return docs, files


MANIFESTS, FILES = load_manifests()


def k8s_validate(doc: dict[str, Any], version: str, where: str) -> None:
    """Validate one resource strictly against the bundled schema of Kubernetes ``version``."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        field = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: invalid for Kubernetes {version} at {field or '(top)'}: {exc.message}")


def as_pod(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    """Wrap a PodSpec fragment in a minimal v1 Pod (kubernetes-validate validates whole resources)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec}


def cronjob_container() -> dict[str, Any]:
    pod = MANIFESTS["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def cronjob_argv() -> list[str]:
    """The CronJob container's ``command + args``, without the leading ``chipflow``."""
    container = cronjob_container()
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "chipflow", argv
    return argv[1:]


def job_yaml_text() -> str:
    return MANIFESTS["ConfigMap"]["data"]["job.yaml"]


# --- the Kubernetes manifests ------------------------------------------------------------------


def test_manifests_are_the_expected_kinds() -> None:
    assert set(MANIFESTS) == CORE_KINDS | {"DaskCluster"}, "a new manifest needs a validation here"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", sorted(CORE_KINDS))
def test_core_manifest_matches_kubernetes_schema(kind: str, version: str) -> None:
    k8s_validate(MANIFESTS[kind], version, FILES[kind])


def test_validation_catches_mistakes() -> None:
    """The schemas are strict: a misspelt field and a wrong type are both refused."""
    cronjob = copy.deepcopy(MANIFESTS["CronJob"])
    cronjob["spec"]["concurrencyPolicy"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, K8S_VERSIONS[0], strict=True)
    pod = as_pod({"containers": [{"name": "x", "image": "y", "comand": ["z"]}]}, "typo")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


def test_cronjob_policies() -> None:
    spec = MANIFESTS["CronJob"]["spec"]
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert job["backoffLimit"] == 3
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = cronjob_container()
    assert {"requests", "limits"} <= set(container["resources"])
    # exit status 2 (bad input) fails the Job at once instead of retrying it
    rules = job.get("podFailurePolicy", {}).get("rules", [])
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert fail_job and fail_job[0]["onExitCodes"]["values"] == [2]
    assert fail_job[0]["onExitCodes"]["containerName"] == container["name"]


def test_cronjob_uses_the_configmap_and_secret() -> None:
    pod = MANIFESTS["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = cronjob_container()
    argv = cronjob_argv()
    config_path = PurePosixPath(argv[argv.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == MANIFESTS["ConfigMap"]["metadata"]["name"]
    assert config_path.name in MANIFESTS["ConfigMap"]["data"]
    secret_refs = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
    assert secret_refs == [MANIFESTS["Secret"]["metadata"]["name"]]


def test_secret_example_holds_s3_credentials() -> None:
    secret = MANIFESTS["Secret"]
    assert secret["type"] == "Opaque"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert "data" not in secret  # placeholders in clear text, never real base64 values


# --- the DaskCluster (a custom resource: checked by hand, its pods by the schema) ---------------


def test_daskcluster_structure() -> None:
    dask = MANIFESTS["DaskCluster"]
    assert dask["apiVersion"] == "kubernetes.dask.org/v1"
    assert dask["kind"] == "DaskCluster"
    worker, scheduler = dask["spec"]["worker"], dask["spec"]["scheduler"]
    assert isinstance(worker["replicas"], int) and not isinstance(worker["replicas"], bool)
    assert worker["replicas"] == 2
    image = cronjob_container()["image"]
    assert worker["spec"]["containers"][0]["image"] == image  # workers run chipflow code
    assert scheduler["spec"]["containers"][0]["image"] == image  # same Dask version everywhere
    ports = {p["port"]: p for p in scheduler["service"]["ports"]}
    assert ports[8786]["name"] == "tcp-comm"
    assert ports[8787]["name"] == "http-dashboard"
    assert scheduler["service"]["selector"]["dask.org/cluster-name"] == dask["metadata"]["name"]
    secret = MANIFESTS["Secret"]["metadata"]["name"]
    assert {"secretRef": {"name": secret}} in worker["spec"]["containers"][0]["envFrom"]


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_daskcluster_runs_with_the_settings_of_chipflows_own_cluster(role: str) -> None:
    """The pods' DASK_* variables, read as Dask reads its environment, give chipflow.local_cluster's settings."""
    import dask

    from chipflow._dask import CLUSTER_CONFIG

    container = MANIFESTS["DaskCluster"]["spec"][role]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    expected: dict = {}
    for key, value in CLUSTER_CONFIG.items():
        dask.config.set({key: value}, config=expected)
    assert dask.config.collect_env(env) == expected


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_daskcluster_pod_specs_match_kubernetes_schema(role: str, version: str) -> None:
    pod_spec = MANIFESTS["DaskCluster"]["spec"][role]["spec"]
    k8s_validate(as_pod(pod_spec, f"chipflow-dask-{role}"), version, f"daskcluster.yaml spec.{role}.spec")


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_daskcluster_commands_parse(role: str) -> None:
    """``dask scheduler`` / ``dask worker`` accept the manifest's arguments (the real click commands)."""
    container = MANIFESTS["DaskCluster"]["spec"][role]["spec"]["containers"][0]
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:2] == ["dask", role]  # replaces the image's `chipflow` entrypoint
    command = importlib.import_module(f"distributed.cli.dask_{role}").main
    ctx = command.make_context(f"dask {role}", argv[2:])
    if role == "worker":
        assert ctx.params["nthreads"] == 1
        assert ctx.params["scheduler"] is None  # the operator sets DASK_SCHEDULER_ADDRESS
    else:
        assert str(ctx.params["port"]) == "8786"


def test_job_config_points_at_the_dask_scheduler_service() -> None:
    """The operator names the scheduler Service ``<DaskCluster name>-scheduler``."""
    config = yaml.safe_load(job_yaml_text())
    name = MANIFESTS["DaskCluster"]["metadata"]["name"]
    assert config["scheduler"] == f"tcp://{name}-scheduler:8786"


# --- the job config and the command line, with chipflow's own code ------------------------------


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    """The ConfigMap's ``job.yaml``, written to a temporary file."""
    path = tmp_path / "job.yaml"
    path.write_text(job_yaml_text())
    return path


def test_job_config_loads(job_file: Path) -> None:
    config = chipflow.cli.load_job_config(str(job_file))
    assert set(config) <= set(chipflow.cli.CONFIG_KEYS)
    assert {"in_raster", "out_folder", "in_class_data"} <= set(config)
    for key in ("in_raster", "out_folder", "in_class_data"):
        assert config[key].startswith("s3://"), key
    assert config.get("overwrite", False) is False  # reruns must resume, not start again
    # the values pass chipflow's own parameter validation (no file is opened)
    accepted = set(inspect.signature(make_config).parameters)
    make_config(**{k: v for k, v in config.items() if k in accepted})


def test_cronjob_command_line_parses(job_file: Path) -> None:
    argv = cronjob_argv()
    config_at = argv.index("--config") + 1
    argv[config_at] = str(job_file)  # the file the ConfigMap mounts, here
    main = chipflow.cli.main
    ctx = main.make_context("chipflow", list(argv))
    name, command, rest = main.resolve_command(ctx, argv)
    assert name == "export"
    sub = command.make_context(name, rest, parent=ctx)
    assert sub.params["config_path"] == str(job_file)


# --- the image -----------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuations joined), one list per ``FROM`` stage."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = [[]]  # stage 0: the global ARGs before the first FROM
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def global_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for ins, rest in dockerfile_stages()[0] if ins == "ARG")


def test_dockerfile_two_slim_stages() -> None:
    stages = dockerfile_stages()[1:]
    assert len(stages) == 2
    args = global_args()
    bases = [stage[0][1].split()[0] for stage in stages]
    resolved = [args[b[2:-1]] if b.startswith("${") else b for b in bases]
    assert resolved == ["python:3.11-slim", "python:3.11-slim"]
    assert stages[0][0][1].split()[-2:] == ["AS", "builder"]


def test_dockerfile_final_stage() -> None:
    final = dockerfile_stages()[-1]
    entrypoint = [rest for ins, rest in final if ins == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoint] == [["chipflow"]]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    run = " ".join(rest for ins, rest in final if ins == "RUN")
    assert "chipflow==${CHIPFLOW_VERSION}" in run and "--no-index" in run
    for compiler in ("build-essential", "gcc", "apt-get install"):
        assert compiler not in run
    assert not [ins for ins, _ in final if ins == "HEALTHCHECK"]


def test_versions_agree() -> None:
    """The image builds the repository's version, and the manifests run that tag."""
    assert global_args()["CHIPFLOW_VERSION"] == VERSION
    images = {cronjob_container()["image"]}
    for role in ("scheduler", "worker"):
        images |= {c["image"] for c in MANIFESTS["DaskCluster"]["spec"][role]["spec"]["containers"]}
    assert len(images) == 1
    assert images.pop().rsplit(":", 1)[1] == VERSION


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # an allow-list
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = []
    for stage in dockerfile_stages()[1:]:
        for ins, rest in stage:
            words = shlex.split(rest)
            if ins == "COPY" and not any(w.startswith("--from") for w in words):
                copied += [w for w in words[:-1] if not w.startswith("--")]
            if ins == "RUN":
                copied += [w.split("=", 1)[1] for part in words if part.startswith("--mount=")
                           for w in part.split(",") if w.startswith("source=") and "from=" not in part]
    assert copied
    for source in copied:
        assert source.rstrip("/") in allowed, source
        assert (ROOT / source).exists(), source


def test_constraints_pin_every_dependency() -> None:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    for raw in PYPROJECT["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} vs {raw}"
    assert "bokeh" in pins  # the scheduler's dashboard
