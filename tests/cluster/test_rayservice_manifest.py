"""cluster/kuberay/rayservice.yaml: the RayService that runs ``instalign serve`` on Kubernetes.

The shipped manifest passes ``tests.support.rayservice_check`` (Serve's own config schema, the
application builder imports, the runtime env matches cluster/runtime_env.yaml, the
RayCluster standard of ``tests.support.cluster_config``); each check is shown to reject a copy
with exactly that mistake, so none passes vacuously.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.support.cluster_config import CLUSTER_DIR, ClusterConfigError, credential_literals, load_documents, \
    load_runtime_env
from tests.support.rayservice_check import check_rayservice

PATH = CLUSTER_DIR / "kuberay" / "rayservice.yaml"


@pytest.fixture(scope="module")
def runtime_env():
    return load_runtime_env()


def _doc() -> dict:
    (doc,) = load_documents(PATH)
    return copy.deepcopy(doc)


def _edit_serve(doc: dict, edit) -> dict:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    edit(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return doc


def test_shipped_rayservice_validates(runtime_env):
    check_rayservice(_doc(), str(PATH), runtime_env=runtime_env)
    assert not credential_literals(_doc(), PATH.read_text(), where=str(PATH))


def _app(c):
    return c["applications"][0]


BROKEN = {
    "bad serve value": (lambda c: _app(c)["deployments"][0].update(max_ongoing_requests="many"), "schema"),
    "wrong import path": (lambda c: _app(c).update(import_path="pipelines.serving.serve:nothing_here"), "import_path"),
    "model not a registry uri": (lambda c: _app(c)["args"].update(model="/tmp/ckpt"), "args.model"),
    "arg the builder ignores": (lambda c: _app(c)["args"].update(replicas=2), "not read"),
    "unknown deployment": (lambda c: _app(c)["deployments"][0].update(name="Model"), "not in the application"),
    "runtime env drift": (lambda c: _app(c)["runtime_env"]["env_vars"].update(EXTRA="1"), "differs"),
    "local working dir": (lambda c: _app(c)["runtime_env"].update(working_dir="."), "remote URI"),
    "route prefix": (lambda c: _app(c).update(route_prefix="/api"), "route_prefix"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_serve_config_is_rejected(case, runtime_env):
    edit, needle = BROKEN[case]
    with pytest.raises(ClusterConfigError, match=needle):
        check_rayservice(_edit_serve(_doc(), edit), "rayservice.yaml", runtime_env=runtime_env)


def test_broken_cluster_is_rejected(runtime_env):
    doc = _doc()
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        group["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    with pytest.raises(ClusterConfigError, match="nvidia.com/gpu"):  # replicas ask for a GPU
        check_rayservice(doc, "rayservice.yaml", runtime_env=runtime_env)
    doc = _doc()
    doc["spec"]["serveService"] = {"spec": {"type": "LoadBalancer"}}
    with pytest.raises(ClusterConfigError, match="ClusterIP"):
        check_rayservice(doc, "rayservice.yaml", runtime_env=runtime_env)
