"""A KubeRay job's log can be followed as documented and outlives its cluster (issue 13).

* KubeRay creates a RayJob's submitter Job only once the cluster is ready, so every
  ``kubectl logs -f job/NAME`` in cluster/README.md and the manifests' comments comes after a
  ``kubectl wait rayjob/NAME`` for ``jobDeploymentStatus`` Running, for a RayJob that exists.
* Every Ray head (RayJobs and the RayCluster) has a ``log-keeper`` container sharing Ray's
  ``/tmp/ray`` with the Ray container and copying the job driver logs to
  ``/mnt/shared/logs/<name>/``; its shell script is run here, against temporary directories,
  to show that it copies a log at once and copies it again when the pod is terminated.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cluster_config import CLUSTER_DIR, SHARED_MOUNT, load_documents

KUBERAY = CLUSTER_DIR / "kuberay"
# The clusters that run jobs (a RayService runs a Serve application, not jobs).
RAY_DOCS = [(p, d) for p in sorted(KUBERAY.glob("ray*.yaml")) for d in load_documents(p)
            if d.get("kind") in ("RayJob", "RayCluster")]
RAYJOBS = {d["metadata"]["name"] for _, d in RAY_DOCS if d["kind"] == "RayJob"}
WAIT = re.compile(r"kubectl wait rayjob/([\w-]+) --for=jsonpath='\{\.status\.jobDeploymentStatus\}'=Running "
                  r"--timeout=\d+m")
FOLLOW = re.compile(r"kubectl logs -f job/([\w-]+)")


def _head(doc: dict) -> dict:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    return spec["headGroupSpec"]["template"]["spec"]


def _keeper(doc: dict) -> dict:
    keepers = [c for c in _head(doc)["containers"] if c["name"] == "log-keeper"]
    assert len(keepers) == 1, doc["metadata"]["name"]
    return keepers[0]


def _check_follow_after_wait(text: str, where: str) -> list[str]:
    """Problems: a `kubectl logs -f job/X` with no earlier `kubectl wait rayjob/X`, or an unknown X."""
    problems = []
    for m in FOLLOW.finditer(text):
        name = m.group(1)
        if name not in RAYJOBS:
            problems.append(f"{where}: follows job/{name}, which is not a RayJob in cluster/kuberay")
        waits = [w.group(1) for w in WAIT.finditer(text[: m.start()])]
        if name not in waits:
            problems.append(f"{where}: `kubectl logs -f job/{name}` without a `kubectl wait rayjob/{name}` before it")
    return problems


def test_follow_only_after_the_rayjob_is_running():
    readme = (CLUSTER_DIR / "README.md").read_text()
    texts = [("cluster/README.md", readme)] + [(p.name, p.read_text()) for p in sorted(KUBERAY.glob("rayjob-*.yaml"))]
    assert sum(len(FOLLOW.findall(t)) for _, t in texts) >= 3
    problems = [p for where, text in texts for p in _check_follow_after_wait(text, where)]
    assert not problems, "\n".join(problems)
    # The check itself: the order that fails for real users is refused.
    bad = "kubectl apply -f x.yaml && kubectl logs -f job/instalign-train\n" \
          "kubectl wait rayjob/instalign-train --for=jsonpath='{.status.jobDeploymentStatus}'=Running --timeout=60m\n"
    assert _check_follow_after_wait(bad, "bad") and _check_follow_after_wait("kubectl logs -f job/nope", "bad")


@pytest.mark.parametrize("path,doc", RAY_DOCS, ids=[f"{p.name}" for p, _ in RAY_DOCS])
def test_every_ray_head_keeps_its_job_logs(path, doc):
    head = _head(doc)
    volumes = {v["name"]: v for v in head["volumes"]}
    ray_mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    keeper = _keeper(doc)
    keeper_mounts = {m["mountPath"]: m["name"] for m in keeper["volumeMounts"]}
    # The keeper reads the Ray container's /tmp/ray (one emptyDir) and writes the shared PVC.
    assert ray_mounts.get("/tmp/ray") and ray_mounts["/tmp/ray"] == keeper_mounts.get("/tmp/ray")
    assert "emptyDir" in volumes[ray_mounts["/tmp/ray"]]
    assert volumes[keeper_mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"]
    script = keeper["args"][0]
    assert f"dest={SHARED_MOUNT}/logs/{doc['metadata']['name']}\n" in script
    assert keeper["image"] == head["containers"][0]["image"]  # one image to pull


def _run_keeper(script: str, root: Path) -> subprocess.Popen:
    local = script.replace("/tmp/ray", str(root / "ray")).replace(SHARED_MOUNT, str(root / "shared"))
    return subprocess.Popen(["/bin/bash", "-c", local])


def _wait_for(cond, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def test_log_keeper_script_copies_and_flushes_on_termination(tmp_path):
    (path, doc) = next((p, d) for p, d in RAY_DOCS if d["metadata"]["name"] == "instalign-train")
    logs = tmp_path / "ray" / "session_2026-11-30_12-00-00_000000_1" / "logs"
    logs.mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(logs.parent.name)
    driver = logs / "job-driver-instalign-train-abcde.log"
    driver.write_text("epoch 1/20 step 10/6560 loss 3.2\n")
    (logs / "raylet.out").write_text("not a job log\n")
    kept = tmp_path / "shared" / "logs" / "instalign-train" / driver.name

    proc = _run_keeper(_keeper(doc)["args"][0], tmp_path)
    try:
        _wait_for(kept.exists, f"{kept} copied at start")
        assert kept.read_text() == driver.read_text()
        with driver.open("a") as f:  # the job goes on writing, then the pod is deleted
            f.write("Traceback: the job failed\n")
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends when the cluster is deleted
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert kept.read_text().endswith("Traceback: the job failed\n")  # the last lines survive the pod
    assert sorted(p.name for p in kept.parent.iterdir()) == [driver.name]  # only job driver logs, no .part left
