"""Checks of a KubeRay ``RayService`` manifest (``cluster/kuberay/rayservice.yaml``).

The same standard as ``tests.support.cluster_config`` applies to the RayCluster a RayService
brings up (``check_ray_cluster_spec``: MLflow credentials from a Secret, shared storage,
ClusterIP head, a GPU group when a replica asks for a GPU). What is particular to a
RayService is its ``serveConfigV2`` — a YAML string that only Ray Serve reads, on the
cluster, minutes after ``kubectl apply``. So it is parsed here with Serve's own schema
(``ServeDeploySchema``), and then:

* every application's ``import_path`` must import here and be ``pipelines.serving.serve:app_builder``
  with the arguments that builder reads (``args.model`` a ``models:/`` URI), at ``route_prefix /``;
* its deployments must be ones the application defines (``InstAlign``) — Serve rejects a
  config naming an unknown deployment only at deploy time;
* its ``runtime_env`` must be ``cluster/runtime_env.yaml`` but for a remote working_dir,
  like a RayJob's;
* the proxy may listen on every interface only inside the pod: the Services stay ClusterIP.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from tests.support.cluster_config import (
    _fail,
    _get,
    check_ray_cluster_spec,
    check_runtime_env,
    embedded_yaml_mapping,
)

APP_BUILDER = "pipelines.serving.serve:app_builder"
#: Keys ``app_builder`` reads from ``args``.
BUILDER_ARGS = {"model", "tracking_uri", "max_batch_size", "batch_wait_timeout_s", "top_words"}


def _deployment_names() -> set[str]:
    from pipelines.serving.serve import InstAlignService

    return {InstAlignService.name}


def check_rayservice(doc: dict[str, Any], where: str, *, runtime_env: Optional[dict[str, Any]] = None) -> None:
    """A KubeRay ``RayService``; raises ``ClusterConfigError`` naming the field."""
    from ray.serve.schema import ServeDeploySchema

    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayService":
        _fail(where, "expected apiVersion ray.io/v1, kind RayService")
    _get(doc, "metadata.name", where, kind=str)
    spec = _get(doc, "spec", where, kind=dict)
    if (spec.get("serveService") or {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        _fail(where, "spec.serveService must stay ClusterIP (the page and /invocations have no authentication)")
    config = embedded_yaml_mapping(spec, "serveConfigV2", where)
    try:
        ServeDeploySchema.model_validate(config)  # pydantic v2 (Ray >= 2.52); parse_obj is deprecated
    except Exception as e:  # pydantic's ValidationError
        _fail(where, f"spec.serveConfigV2: Ray Serve's schema rejects it: {str(e).splitlines()[0]} "
                     f"{' '.join(str(e).splitlines()[1:3])}")
    apps = _get(config, "applications", f"{where} spec.serveConfigV2", kind=list)
    if not apps:
        _fail(where, "spec.serveConfigV2.applications is empty")
    need_gpu = False
    for i, app in enumerate(apps):
        at = f"{where} spec.serveConfigV2.applications[{i}]"
        path = _get(app, "import_path", at, kind=str)
        if path != APP_BUILDER:
            _fail(at, f"import_path {path!r}: expected {APP_BUILDER!r}")
        module, _, attr = path.partition(":")
        if not callable(getattr(importlib.import_module(module), attr, None)):
            _fail(at, f"import_path {path!r} does not name a callable")
        if app.get("route_prefix", "/") != "/":
            _fail(at, "route_prefix must be / (the page at / calls the application's routes relative to it)")
        args = _get(app, "args", at, kind=dict)
        unknown = set(args) - BUILDER_ARGS
        if unknown:
            _fail(at, f"args {sorted(unknown)} are not read by {APP_BUILDER} (it reads {sorted(BUILDER_ARGS)})")
        if not str(args.get("model", "")).startswith("models:/"):
            _fail(at, f"args.model must be a registry URI models:/NAME@ALIAS or models:/NAME/VERSION, "
                      f"got {args.get('model')!r}")
        env = _get(app, "runtime_env", at, kind=dict)
        check_runtime_env(env, f"{at}.runtime_env", remote=True)
        if runtime_env is not None:
            def strip(d: dict[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in d.items() if k not in ("working_dir", "excludes")}
            if strip(env) != strip(runtime_env):
                _fail(at, f"runtime_env differs from cluster/runtime_env.yaml (other than working_dir): "
                          f"{strip(env)} != {strip(runtime_env)}")
        names = _deployment_names()
        for j, dep in enumerate(app.get("deployments") or []):
            if dep.get("name") not in names:
                _fail(f"{at}.deployments[{j}]", f"deployment {dep.get('name')!r} is not in the application "
                                                f"(it has {sorted(names)})")
            need_gpu |= float((dep.get("ray_actor_options") or {}).get("num_gpus") or 0) > 0
    check_ray_cluster_spec(_get(spec, "rayClusterConfig", where, kind=dict), f"{where} spec.rayClusterConfig",
                           need_gpu=need_gpu)
