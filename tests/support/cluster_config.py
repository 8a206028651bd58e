"""Load and check the cluster configs under ``cluster/`` (DESIGN §5: launcher, KubeRay, runtime env).

A mistake in a cluster manifest shows up only on a cloud cluster, minutes and money later:
a GPU group without ``nvidia.com/gpu``, an entrypoint flag the CLI no longer has, a password
pasted into an ``env`` block. These checks catch that on a laptop and in CI:

* the **runtime environment** (``cluster/runtime_env.yaml``) goes through Ray's own
  ``RuntimeEnv`` validation and must install this project from its working_dir;
* the **cluster-launcher YAML** goes through Ray's ``prepare_config`` + ``validate_config``
  (what ``ray up`` runs), plus: a GPU worker type that autoscales, the dashboard on loopback;
* **KubeRay** ``RayCluster`` / ``RayJob`` manifests: ``ray.io/v1``, head and worker groups,
  GPU limits, MLflow variables from ``secretKeyRef``, shared storage, a ClusterIP head
  service, and for a RayJob an entrypoint whose every ``instalign VERB --flags`` is parsed
  by the real CLI parser and a ``runtimeEnvYAML`` equal to the runtime env file but for its
  remote working_dir;
* no credential literal anywhere (env values, strings, comments).

Every problem is a ``ClusterConfigError`` naming the file and the field.
``python -m tests.support.cluster_config [DIR]`` (from the repository root) checks a whole directory.
This is test and CI tooling, not part of the installed package: nothing under ``pipelines/``
or ``instalign/`` imports it (``tests/pipelines/test_import_graph.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "cluster"
RUNTIME_ENV_FILE = CLUSTER_DIR / "runtime_env.yaml"

#: Where Ray unpacks a job's working_dir on each node (expanded by Ray, not by a shell).
WORKING_DIR_VAR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
#: Environment the Ray containers must take from the MLflow Secret.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
#: The shared volume's mount point (same on the launcher's EFS and KubeRay's PVC).
SHARED_MOUNT = "/mnt/shared"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "https://", "az://", "abfss://")
LOOPBACK = ("127.0.0.1", "localhost", "::1")

#: Variable names whose value is a secret: they may only come from a secret store.
_SECRET_NAME = re.compile(r"(?i)(^|_)(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Literal credentials in any text: an AWS key id, a PEM private key, a URL with user:password@,
#: ``password=...`` / ``token: ...`` with a literal (not ``$VAR``) value.
_SECRET_TEXT = (
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"$]+@"), "a URL with an embedded password"),
    (re.compile(r"(?i)\b\w*(password|passwd|secret|api_?key)\w*\s*[=:]\s*['\"]?(?![$'\"<{\s])[^\s'\"]{4,}"),
     "a literal password/secret assignment"),
)


class ClusterConfigError(ValueError):
    """A cluster config is invalid; the message names the file and the field."""


def _fail(where: str, msg: str) -> None:
    raise ClusterConfigError(f"{where}: {msg}")


def embedded_yaml_mapping(spec: dict, field: str, where: str) -> dict:
    """``spec[field]``: a YAML document held as a string (a KubeRay field), parsed to a mapping."""
    text = _get(spec, field, where, kind=str)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{where}: spec.{field} is not valid YAML: {e}") from None
    if not isinstance(value, dict):
        _fail(where, f"spec.{field} must be a mapping")
    return value


def _get(doc: Any, dotted: str, where: str, *, kind: type | tuple[type, ...] | None = None) -> Any:
    """``doc[a][b][c]`` for ``"a.b.c"``, or an error naming the missing field."""
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            _fail(where, f"missing field {dotted!r}")
        node = node[part]
    if kind is not None and not isinstance(node, kind):
        _fail(where, f"field {dotted!r} should be {getattr(kind, '__name__', kind)}, got {node!r}")
    return node


# --- loading ---------------------------------------------------------------------------------

def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Every YAML document in ``path`` (a manifest may hold several), each a mapping."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{path}: not valid YAML: {e}") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            _fail(f"{path} (document {i})", f"expected a mapping, got {type(doc).__name__}")
    return docs


def load_runtime_env(path: str | Path = RUNTIME_ENV_FILE, *, working_dir: str | None = None,
                     env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The project's runtime environment as a dict for ``ray job submit`` / ``JobSubmissionClient``.

    Args:
        path: the runtime-env YAML (default ``cluster/runtime_env.yaml``).
        working_dir: replaces the file's ``working_dir`` (as ``--working-dir`` does on the CLI).
        env_vars: added to the file's ``env_vars`` (per-job settings such as a tracking URI).
    """
    (data,) = load_documents(path) or [{}]
    if working_dir is not None:
        data["working_dir"] = str(working_dir)
    if env_vars:
        data["env_vars"] = {**data.get("env_vars", {}), **{k: str(v) for k, v in env_vars.items()}}
    check_runtime_env(data, str(path))
    return data


# --- credentials -----------------------------------------------------------------------------

def credential_literals(doc: Any, text: str = "", *, where: str = "") -> list[str]:
    """Places where a credential is written literally: env entries, mappings, strings, comments.

    A secret-named variable (``*PASSWORD*``, ``*TOKEN*``, ``*SECRET*``...) must come from a
    secret store (``valueFrom.secretKeyRef``, an env file outside the repository); a value
    that is a ``$VARIABLE`` reference is not a literal.
    """
    found: list[str] = []

    def walk(node: Any, at: str) -> None:
        if isinstance(node, dict):
            name = node.get("name")
            if isinstance(name, str) and "value" in node and _SECRET_NAME.search(name):
                found.append(f"{at}: env {name} has a literal value (use valueFrom.secretKeyRef)")
            for key, value in node.items():
                if (isinstance(key, str) and _VAR_NAME.match(key) and _SECRET_NAME.search(key)
                        and isinstance(value, (str, int))
                        and not str(value).startswith("$")):
                    found.append(f"{at + '.' if at else ''}{key}: literal value for a secret-named key")
                walk(value, f"{at}.{key}" if at else str(key))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{at}[{i}]")
        elif isinstance(node, str):
            found.extend(f"{at}: {what}" for rx, what in _SECRET_TEXT if rx.search(node))

    walk(doc, "")
    for lineno, line in enumerate(text.splitlines(), 1):
        found.extend(f"line {lineno}: {what}" for rx, what in _SECRET_TEXT if rx.search(line))
    return [f"{where}: {f}" if where else f for f in dict.fromkeys(found)]


# --- runtime env -----------------------------------------------------------------------------

def check_runtime_env(data: dict[str, Any], where: str, *, remote: bool = False) -> None:
    """A runtime env that Ray accepts and that installs this project from its working_dir.

    Args:
        data: the runtime env mapping.
        where: the file (and field) named in errors.
        remote: the working_dir must be a remote URI (a RayJob's, with no local files to upload).
    """
    from ray.runtime_env import RuntimeEnv

    working_dir = data.get("working_dir")
    if not isinstance(working_dir, str) or not working_dir:
        _fail(where, "missing field 'working_dir' (the project's code travels with each job)")
    if remote and not working_dir.startswith(REMOTE_SCHEMES):
        _fail(where, f"working_dir {working_dir!r} must be a remote URI ({', '.join(REMOTE_SCHEMES)}) "
                     "in a manifest: a RayJob has no local directory to upload")
    pip = data.get("pip")
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip or []
    if not any(isinstance(p, str) and p.split()[-1] == WORKING_DIR_VAR for p in packages):
        _fail(where, f"pip.packages must install the project from its working_dir ({WORKING_DIR_VAR}) "
                     "so that the `instalign` command exists on every node")
    leaks = credential_literals({"env_vars": data.get("env_vars", {})})
    if leaks:
        _fail(where, "; ".join(leaks))
    try:
        RuntimeEnv(**data)
    except (TypeError, ValueError) as e:
        _fail(where, f"Ray rejects this runtime env: {e}")


# --- entrypoints -----------------------------------------------------------------------------

def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The simple commands of a shell entrypoint (``a && b; c`` → ``[[a], [b], [c]]``)."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def check_entrypoint(entrypoint: str, where: str) -> list[str]:
    """Every command is ``instalign VERB ...`` that the real CLI parser accepts; returns the verbs."""
    from pipelines.cli import VERBS, build_parser

    commands = entrypoint_commands(entrypoint)
    if not commands:
        _fail(where, "empty entrypoint")
    verbs = []
    for argv in commands:
        if argv[0] != "instalign":
            _fail(where, f"entrypoint command {shlex.join(argv)!r} does not run `instalign`")
        if len(argv) < 2 or argv[1] not in VERBS:
            _fail(where, f"entrypoint {shlex.join(argv)!r}: unknown verb; valid: {sorted(VERBS)}")
        err = io.StringIO()
        try:
            parser = build_parser(argv[1])
        except ImportError as e:
            _fail(where, f"entrypoint verb {argv[1]!r}: its module {VERBS[argv[1]][0]} cannot be imported: {e}")
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv[1:])
        except SystemExit:
            _fail(where, f"entrypoint {shlex.join(argv)!r} is rejected by the CLI: {err.getvalue().strip()}")
        verbs.append(argv[1])
    return verbs


# --- cluster launcher ------------------------------------------------------------------------

def _flag(command: str, flag: str) -> str | None:
    for token in shlex.split(command.replace(";", " ")):
        if token.startswith(f"{flag}="):
            return token.split("=", 1)[1]
    return None


def check_launcher(cfg: dict[str, Any], where: str) -> None:
    """A cloud cluster-launcher config (``ray up``) with a CPU head and autoscaling GPU workers."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    for key in ("cluster_name", "provider.type", "max_workers", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        _get(cfg, key, where)
    types = _get(cfg, "available_node_types", where, kind=dict)
    head_type = cfg["head_node_type"]
    if head_type not in types:
        _fail(where, f"head_node_type {head_type!r} is not one of available_node_types {sorted(types)}")
    for name, node in types.items():
        resources = _get(node, "resources", f"{where} available_node_types.{name}", kind=dict)
        _get(node, "node_config", f"{where} available_node_types.{name}", kind=dict)
        if name != head_type and "CPU" not in resources:
            _fail(where, f"available_node_types.{name}.resources: declare CPU so the autoscaler can plan")
    if types[head_type]["resources"].get("GPU", 0):
        _fail(where, f"available_node_types.{head_type}: the head should be a CPU node")
    gpu = [n for n, t in types.items() if n != head_type and t["resources"].get("GPU", 0) > 0]
    if not gpu:
        _fail(where, "available_node_types: no worker type with resources.GPU > 0")
    for name in gpu:
        lo, hi = types[name].get("min_workers", 0), types[name].get("max_workers", 0)
        if not hi > lo:
            _fail(where, f"available_node_types.{name}: GPU workers must autoscale (max_workers {hi} > min_workers {lo})")
    if not any(c.strip() for c in cfg["setup_commands"]):
        _fail(where, "setup_commands is empty")
    starts = " ".join(cfg["head_start_ray_commands"])
    if "ray start --head" not in re.sub(r"\s+", " ", starts):
        _fail(where, "head_start_ray_commands does not run `ray start --head`")
    host = _flag(starts, "--dashboard-host")
    if host not in LOOPBACK:
        _fail(where, f"head_start_ray_commands: --dashboard-host={host} — the job API runs arbitrary code; "
                     "bind it to 127.0.0.1 and reach it with `ray dashboard` (an SSH tunnel)")
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))  # prepare_config fills defaults in place
    except Exception as e:  # jsonschema.ValidationError, ValueError: Ray's own messages
        _fail(where, f"Ray's launcher schema rejects it: {type(e).__name__}: {str(e).splitlines()[0]}")


# --- KubeRay -------------------------------------------------------------------------------------

def _containers(group: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = _get(group, "template.spec.containers", where, kind=list)
    if not containers:
        _fail(where, "template.spec.containers is empty")
    return containers


def _check_pod(group: dict[str, Any], where: str) -> None:
    """MLflow env from the Secret, the shared volume, an image, on the group's Ray container."""
    ray_container = _containers(group, where)[0]  # KubeRay runs Ray in the first container
    if not ray_container.get("image"):
        _fail(where, "the Ray container has no image")
    env = {e.get("name"): e for e in ray_container.get("env", []) if isinstance(e, dict)}
    for name in MLFLOW_ENV:
        ref = (env.get(name) or {}).get("valueFrom", {}).get("secretKeyRef", {})
        if not (ref.get("name") and ref.get("key")):
            _fail(where, f"env {name} must come from valueFrom.secretKeyRef (a Kubernetes Secret)")
    mounts = {m.get("mountPath"): m.get("name") for m in ray_container.get("volumeMounts", [])}
    if SHARED_MOUNT not in mounts:
        _fail(where, f"no volume mounted at {SHARED_MOUNT} (shared data and checkpoints)")
    volumes = {v.get("name"): v for v in group["template"]["spec"].get("volumes", [])}
    volume = volumes.get(mounts[SHARED_MOUNT], {})
    if not volume.get("persistentVolumeClaim", {}).get("claimName"):
        _fail(where, f"the volume at {SHARED_MOUNT} must be a persistentVolumeClaim")


def _gpus(group: dict[str, Any]) -> int:
    limits = (group["template"]["spec"]["containers"][0].get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict[str, Any], where: str, *, need_gpu: bool = True) -> None:
    """A ``RayClusterSpec`` (a RayCluster's ``spec`` or a RayJob's ``rayClusterSpec``)."""
    _get(spec, "rayVersion", where, kind=str)
    head = _get(spec, "headGroupSpec", where, kind=dict)
    _check_pod(head, f"{where} headGroupSpec")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or spec.get("headServiceAnnotations") or head.get("enableIngress"):
        _fail(where, "headGroupSpec: the head service must stay ClusterIP without ingress (use port-forward)")
    if str(head.get("rayStartParams", {}).get("dashboard-host", "127.0.0.1")) not in ("0.0.0.0",) + LOOPBACK:
        _fail(where, "headGroupSpec.rayStartParams.dashboard-host must be 0.0.0.0 (pod-internal) or loopback")
    groups = _get(spec, "workerGroupSpecs", where, kind=list)
    if not groups:
        _fail(where, "workerGroupSpecs is empty")
    for i, group in enumerate(groups):
        at = f"{where} workerGroupSpecs[{i}]"
        for key in ("groupName", "minReplicas", "maxReplicas"):
            _get(group, key, at)
        if group["maxReplicas"] < max(group["minReplicas"], 1):
            _fail(at, f"maxReplicas {group['maxReplicas']} < minReplicas {group['minReplicas']}")
        _check_pod(group, f"{at} ({group['groupName']})")
    if need_gpu and not any(_gpus(g) > 0 for g in groups):
        _fail(where, "workerGroupSpecs: no group with resources.limits['nvidia.com/gpu'] > 0")
    elastic = [g["groupName"] for g in groups if g["minReplicas"] < g["maxReplicas"]]
    if elastic and spec.get("enableInTreeAutoscaling") is not True:
        _fail(where, f"worker groups {elastic} have minReplicas < maxReplicas: set enableInTreeAutoscaling: true")


def check_kuberay(doc: dict[str, Any], where: str, *, runtime_env: dict[str, Any] | None = None) -> list[str]:
    """A KubeRay ``RayCluster``, ``RayJob`` or ``RayService``; returns the entrypoint's verbs (RayJob)."""
    if doc.get("apiVersion") != "ray.io/v1":
        _fail(where, f"apiVersion {doc.get('apiVersion')!r}: expected 'ray.io/v1'")
    kind = doc.get("kind")
    _get(doc, "metadata.name", where, kind=str)
    if kind == "RayCluster":
        check_ray_cluster_spec(_get(doc, "spec", where, kind=dict), f"{where} spec")
        return []
    if kind == "RayService":  # its Serve config through Serve's own schema (tests.support.rayservice_check)
        from tests.support.rayservice_check import check_rayservice  # lazy: that module imports this one

        check_rayservice(doc, where, runtime_env=runtime_env)
        return []
    if kind != "RayJob":
        _fail(where, f"kind {kind!r}: expected RayCluster, RayJob or RayService")
    spec = _get(doc, "spec", where, kind=dict)
    verbs = check_entrypoint(_get(spec, "entrypoint", where, kind=str), f"{where} spec.entrypoint")
    need_gpu = any(v in ("train", "tune", "evaluate") for v in verbs)
    check_ray_cluster_spec(_get(spec, "rayClusterSpec", where, kind=dict), f"{where} spec.rayClusterSpec",
                           need_gpu=need_gpu)
    env = embedded_yaml_mapping(spec, "runtimeEnvYAML", where)
    check_runtime_env(env, f"{where} spec.runtimeEnvYAML", remote=True)
    if runtime_env is not None:
        # The manifest must run the same environment as `ray job submit --runtime-env`; only
        # the code's location (and upload excludes, meaningless for a URI) may differ.
        def strip(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if k not in ("working_dir", "excludes")}
        if strip(env) != strip(runtime_env):
            _fail(where, "spec.runtimeEnvYAML differs from cluster/runtime_env.yaml (other than working_dir): "
                         f"{strip(env)} != {strip(runtime_env)}")
    return verbs


# --- whole files and directories ------------------------------------------------------------

#: Plain Kubernetes kinds that may sit beside the Ray manifests (storage, identity).
K8S_SUPPORT_KINDS = {("v1", "PersistentVolumeClaim"), ("v1", "ServiceAccount"), ("v1", "ConfigMap")}


def check_file(path: str | Path, *, runtime_env: dict[str, Any] | None = None) -> list[str]:
    """Check one YAML file under ``cluster/``; returns what each document is."""
    path = Path(path)
    text = path.read_text()
    docs = load_documents(path)
    leaks = credential_literals(docs[0] if len(docs) == 1 else docs, text, where=str(path))
    if leaks:
        raise ClusterConfigError("; ".join(leaks))
    kinds = []
    for i, doc in enumerate(docs):
        where = f"{path}" if len(docs) == 1 else f"{path} (document {i})"
        if path.name == RUNTIME_ENV_FILE.name:
            check_runtime_env(doc, where)
            kinds.append("runtime_env")
        elif "provider" in doc and "available_node_types" in doc:
            check_launcher(doc, where)
            kinds.append("launcher")
        elif str(doc.get("apiVersion", "")).startswith("ray.io/"):
            check_kuberay(doc, where, runtime_env=runtime_env)
            kinds.append(doc["kind"])
        elif (doc.get("apiVersion"), doc.get("kind")) in K8S_SUPPORT_KINDS:
            _get(doc, "metadata.name", where, kind=str)
            kinds.append(doc["kind"])
        else:
            _fail(where, "not a recognised cluster config (launcher YAML, runtime env, KubeRay or "
                         f"{sorted(k for _, k in K8S_SUPPORT_KINDS)} manifest)")
    return kinds


def yaml_files(directory: str | Path = CLUSTER_DIR) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.suffix in (".yaml", ".yml"))


def check_directory(directory: str | Path = CLUSTER_DIR) -> dict[str, list[str]]:
    """Check every YAML under ``directory`` against the runtime env file found there."""
    directory = Path(directory)
    env_file = directory / RUNTIME_ENV_FILE.name
    runtime_env = load_runtime_env(env_file) if env_file.is_file() else None
    return {str(p.relative_to(directory)): check_file(p, runtime_env=runtime_env) for p in yaml_files(directory)}


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.cluster_config",
                                     description="check the cluster configs (launcher, KubeRay, runtime env)")
    parser.add_argument("directory", nargs="?", default=str(CLUSTER_DIR))
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        report = check_directory(args.directory)
    except ClusterConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, kinds in report.items():
        print(f"ok  {name}: {', '.join(kinds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
