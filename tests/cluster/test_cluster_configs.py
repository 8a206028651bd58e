"""Every YAML under cluster/ loads and validates; broken copies of them are rejected (DESIGN §6.11).

The shipped files go through the same checks a user would want before paying for a cluster:
Ray's own launcher schema and runtime-env validation, KubeRay structure (GPU limits, MLflow
credentials from a Secret, shared storage, ClusterIP head), entrypoints parsed by the real
``instalign`` CLI parser, no credential literal. Each check is also shown to fail on a copy
with exactly that mistake, so none of them passes vacuously.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import VERBS
from tests.support.cluster_config import (
    CLUSTER_DIR,
    MLFLOW_ENV,
    REPO,
    RUNTIME_ENV_FILE,
    SHARED_MOUNT,
    WORKING_DIR_VAR,
    ClusterConfigError,
    check_directory,
    check_entrypoint,
    check_file,
    check_kuberay,
    check_launcher,
    check_runtime_env,
    credential_literals,
    entrypoint_commands,
    load_documents,
    load_runtime_env,
    main,
    yaml_files,
)

LAUNCHER = CLUSTER_DIR / "aws-gpu.yaml"
KUBERAY = CLUSTER_DIR / "kuberay"
RAYJOBS = {"prepare": KUBERAY / "rayjob-prepare.yaml", "train": KUBERAY / "rayjob-train.yaml",
           "tune": KUBERAY / "rayjob-tune.yaml"}


@pytest.fixture(scope="module")
def runtime_env():
    return load_runtime_env()


def _doc(path: Path) -> dict:
    (doc,) = load_documents(path)
    return copy.deepcopy(doc)


def _ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in yaml_files(KUBERAY) for d in load_documents(p) if d.get("apiVersion") == "ray.io/v1"]


# --- the shipped files ------------------------------------------------------------------------

@pytest.mark.parametrize("path", yaml_files(CLUSTER_DIR), ids=lambda p: str(p.relative_to(CLUSTER_DIR)))
def test_every_shipped_yaml_validates(path, runtime_env):
    assert check_file(path, runtime_env=runtime_env)


def test_cluster_dir_has_every_kind():
    report = check_directory(CLUSTER_DIR)
    kinds = [k for ks in report.values() for k in ks]
    assert report["runtime_env.yaml"] == ["runtime_env"]
    assert report["aws-gpu.yaml"] == ["launcher"]
    assert "RayCluster" in kinds and "PersistentVolumeClaim" in kinds
    assert all(p.is_file() for p in RAYJOBS.values())
    assert main([str(CLUSTER_DIR)]) == 0


@pytest.mark.parametrize("verb", sorted(RAYJOBS))
def test_one_rayjob_per_stage_runs_that_verb(verb, runtime_env):
    doc = _doc(RAYJOBS[verb])
    assert doc["kind"] == "RayJob"
    assert check_kuberay(doc, str(RAYJOBS[verb]), runtime_env=runtime_env) == [verb]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True  # an ephemeral cluster per job
    for argv in entrypoint_commands(doc["spec"]["entrypoint"]):
        # Data and checkpoints on the shared volume: every absolute path argument is under it.
        paths = [a for a in argv if a.startswith("/")]
        assert paths and all(a.startswith(SHARED_MOUNT + "/") for a in paths), argv
        # Relative files travel in the code zip: they must exist in the repository, and a
        # search space must load (keys, ranges and switch values checked against the config).
        for rel in [a for a in argv if a.endswith((".yaml", ".yml")) and not a.startswith("/")]:
            assert (REPO / rel).is_file(), rel
            if rel.startswith("tune_spaces/"):
                from pipelines.tuning.space import load_space

                assert load_space(REPO / rel).params


def test_launcher_shape():
    cfg = _doc(LAUNCHER)
    check_launcher(cfg, str(LAUNCHER))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= cfg["max_workers"] for t in gpu)
    # Credentials reach the nodes as files from the user's machine, never from the repository.
    assert all(src.startswith("~/") for src in cfg["file_mounts"].values())
    assert any("mlflow.env" in dst for dst in cfg["file_mounts"])
    # The shared volume is mounted into the container at the path the entrypoints use.
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in cfg["docker"]["run_options"]


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any KubeRay kind (RayJob: rayClusterSpec, RayService: rayClusterConfig)."""
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def test_kuberay_gpu_groups_secrets_and_storage():
    for path, doc in _ray_docs():
        spec = _cluster_spec(doc)
        groups = spec["workerGroupSpecs"]
        gpu_limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
                      for g in groups]
        # a RayService's replicas ask for a GPU each; a RayJob needs one unless it only prepares data
        needs_gpu = doc["kind"] in ("RayCluster", "RayService") or "prepare" not in doc["spec"]["entrypoint"]
        assert (max(gpu_limits) >= 1) == needs_gpu, path
        for group in [spec["headGroupSpec"], *groups]:
            container = group["template"]["spec"]["containers"][0]
            env = {e["name"]: e for e in container["env"]}
            for name in MLFLOW_ENV:
                assert "value" not in env[name]
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "instalign-mlflow", (path, name)
            assert SHARED_MOUNT in {m["mountPath"] for m in container["volumeMounts"]}
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert spec["authOptions"]["mode"] == "token"


def test_versions_and_images_agree():
    """One Ray version everywhere: the images, rayVersion, the Dockerfile and the submitting client."""
    import ray

    images = {c["image"] for _, d in _ray_docs()
              for g in [_cluster_spec(d)["headGroupSpec"], *_cluster_spec(d)["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    images.add(_doc(LAUNCHER)["docker"]["image"])
    assert len(images) == 1, images
    versions = {_cluster_spec(d)["rayVersion"] for _, d in _ray_docs()}
    assert versions == {ray.__version__}
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", dockerfile, re.M)
    assert f":{ray.__version__}-" in images.pop()


def test_runtime_env_installs_this_project(runtime_env):
    """The pip entry installs the uploaded working_dir, whose pyproject provides `instalign`."""
    import tomllib

    assert runtime_env["working_dir"] == "."
    assert WORKING_DIR_VAR in runtime_env["pip"]["packages"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "instalign"
    assert project["scripts"]["instalign"] == "pipelines.cli:main"
    merged = load_runtime_env(working_dir=str(REPO), env_vars={"MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert merged["working_dir"] == str(REPO)
    assert merged["env_vars"]["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert merged["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"  # file's own vars kept


def test_readme_documents_submission_and_bindings():
    readme = (CLUSTER_DIR / "README.md").read_text()
    for path in [LAUNCHER, *RAYJOBS.values(), KUBERAY / "raycluster.yaml", RUNTIME_ENV_FILE]:
        assert str(path.relative_to(REPO)) in readme, path
    # Every `ray job submit ... -- instalign ...` in the README parses with the real CLI.
    submits = re.findall(r"^ray job submit (.*?) -- (instalign .*)$", readme, re.M)
    assert {shlex.split(c)[1] for _, c in submits} >= {"prepare", "train", "tune"}
    for options, command in submits:
        assert options == "--working-dir . --runtime-env cluster/runtime_env.yaml"
        check_entrypoint(command, "cluster/README.md")
    # Servers bind as documented: model server and dashboard on loopback, reached by tunnel.
    for line in re.findall(r"mlflow models serve[^\n]*", readme):
        assert "-h 127.0.0.1" in line, line
    assert "--dashboard-host=127.0.0.1" in LAUNCHER.read_text()


# --- each check fails on a copy with that mistake -------------------------------------------

def test_launcher_mistakes_are_named():
    base = _doc(LAUNCHER)
    cases = []
    no_gpu = copy.deepcopy(base)
    no_gpu["available_node_types"]["gpu_worker"]["resources"].pop("GPU")
    cases.append((no_gpu, "no worker type with resources.GPU"))
    fixed = copy.deepcopy(base)
    fixed["available_node_types"]["gpu_worker"]["min_workers"] = 8
    cases.append((fixed, "must autoscale"))
    public = copy.deepcopy(base)
    public["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                         for c in base["head_start_ray_commands"]]
    cases.append((public, "--dashboard-host=0.0.0.0"))
    typo = copy.deepcopy(base)
    typo["idle_timeout_minute"] = 5  # not in Ray's schema
    cases.append((typo, "Ray's launcher schema rejects it"))
    headless = copy.deepcopy(base)
    headless["head_node_type"] = "gpu-head"
    cases.append((headless, "head_node_type 'gpu-head'"))
    for cfg, message in cases:
        with pytest.raises(ClusterConfigError, match=re.escape(message)):
            check_launcher(cfg, "aws-gpu.yaml")


def test_kuberay_mistakes_are_named(runtime_env):
    base = _doc(RAYJOBS["train"])
    where = "rayjob-train.yaml"

    def broken(edit):
        doc = copy.deepcopy(base)
        edit(doc)
        return doc

    def worker(doc):
        return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]

    def literal_password(doc):
        env = worker(doc)["env"]
        env[[e["name"] for e in env].index("MLFLOW_TRACKING_PASSWORD")] = {"name": "MLFLOW_TRACKING_PASSWORD",
                                                                          "value": "hunter22"}

    def drift(doc):
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        env["env_vars"]["EXTRA"] = "1"
        doc["spec"]["runtimeEnvYAML"] = yaml.safe_dump(env)

    def local_dir(doc):
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        env["working_dir"] = "."
        doc["spec"]["runtimeEnvYAML"] = yaml.safe_dump(env)

    cases = [
        (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "expected 'ray.io/v1'"),
        (lambda d: [g["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
                    for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"]], "nvidia.com/gpu"),
        (literal_password, "MLFLOW_TRACKING_PASSWORD must come from valueFrom.secretKeyRef"),
        (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "ClusterIP"),
        (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " --no-such-flag"),
         "unrecognized arguments: --no-such-flag"),
        (lambda d: d["spec"].update(entrypoint="instalign fly --to mars"), "unknown verb"),
        (lambda d: d["spec"].update(entrypoint="python train.py"), "does not run `instalign`"),
        (drift, "differs from cluster/runtime_env.yaml"),
        (local_dir, "must be a remote URI"),
        (lambda d: worker(d)["volumeMounts"].clear(), f"no volume mounted at {SHARED_MOUNT}"),
        (lambda d: d["spec"]["rayClusterSpec"].pop("enableInTreeAutoscaling"), "enableInTreeAutoscaling"),
    ]
    for edit, message in cases:
        with pytest.raises(ClusterConfigError, match=re.escape(message)):
            check_kuberay(broken(edit), where, runtime_env=runtime_env)


def test_runtime_env_mistakes_are_named(runtime_env):
    no_project = {**runtime_env, "pip": {"packages": ["requests"]}}
    with pytest.raises(ClusterConfigError, match="must install the project"):
        check_runtime_env(no_project, "runtime_env.yaml")
    with pytest.raises(ClusterConfigError, match="Ray rejects this runtime env"):
        check_runtime_env({**runtime_env, "pip": {**runtime_env["pip"], "pip_chek": False}}, "runtime_env.yaml")
    with pytest.raises(ClusterConfigError, match="literal value for a secret-named key"):
        check_runtime_env({**runtime_env, "env_vars": {"MLFLOW_TRACKING_TOKEN": "abc123def"}}, "runtime_env.yaml")
    with pytest.raises(ClusterConfigError, match="missing field 'working_dir'"):
        check_runtime_env({k: v for k, v in runtime_env.items() if k != "working_dir"}, "runtime_env.yaml")


def test_credential_scanner():
    assert credential_literals({"env_vars": {"MLFLOW_TRACKING_PASSWORD": "$MLFLOW_TRACKING_PASSWORD",
                                             "TOKENIZERS_PARALLELISM": "false"}}) == []
    assert credential_literals({"file_mounts": {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}}) == []
    assert credential_literals([{"name": "HF_TOKEN", "value": "hf_abcdefgh"}])
    assert credential_literals({"uri": "https://alice:s3cret@mlflow.example.com"})
    assert credential_literals({}, "# AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP\n")
    assert credential_literals({}, "  --from-literal=password=hunter22\n")
    assert not credential_literals({}, '  --from-literal=password="$MLFLOW_TRACKING_PASSWORD"\n')
    leaked = Path(LAUNCHER).read_text() + "\n# mlflow password: hunter22\n"
    assert credential_literals(yaml.safe_load(leaked), leaked)


def test_entrypoint_splitting():
    assert entrypoint_commands("instalign synthetic --out /d && instalign prepare --root '/a b'; echo x") == [
        ["instalign", "synthetic", "--out", "/d"], ["instalign", "prepare", "--root", "/a b"], ["echo", "x"]]
    assert check_entrypoint("instalign synthetic --out /tmp/x --num-images 4", "t") == ["synthetic"]
    with pytest.raises(ClusterConfigError, match="the following arguments are required: --out"):
        check_entrypoint("instalign synthetic --num-images 4", "t")
    assert {"prepare", "train", "tune"} <= set(VERBS)
