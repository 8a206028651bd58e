"""Shared storage in the cluster configs belongs to the job's user or group only (issue 11).

Tune resumes by unpickling its state from the shared ``ray_results``; a world-writable
directory there (the old ``chmod 1777``) lets any local user run code as the job. Every shell
command in every YAML under ``cluster/`` is parsed; each ``chmod`` must leave "other" without
write permission, and the launcher config must hand the shared directories to one user and
group with no permission for others. Each check is shown to fail on the old line.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.support.cluster_config import CLUSTER_DIR, SHARED_MOUNT, yaml_files

AWS = CLUSTER_DIR / "aws-gpu.yaml"
SHARED_DIRS = [f"{SHARED_MOUNT}/raw", f"{SHARED_MOUNT}/data", f"{SHARED_MOUNT}/ray_results"]
OLD_LINE = "sudo mkdir -p /mnt/shared/raw /mnt/shared/data /mnt/shared/ray_results && sudo chmod 1777 /mnt/shared/*"


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _commands(text: str) -> list[list[str]]:
    """Simple commands (argv lists) in a shell string, split at ``&&``, ``||``, ``;``, pipes and newlines."""
    out = []
    for part in re.split(r"&&|\|\||;|\||\n", text):
        try:
            words = shlex.split(part)
        except ValueError:  # not shell (a YAML string that is prose or a quoted fragment)
            continue
        while words and words[0] in ("sudo", "-E", "exec"):
            words = words[1:]
        if words:
            out.append(words)
    return out


def _others_can_write(mode: str) -> bool:
    if re.fullmatch(r"[0-7]{1,4}", mode):
        return bool(int(mode, 8) & 0o002)
    for clause in mode.split(","):  # symbolic: [ugoa]*[+=][rwxXst]*
        m = re.fullmatch(r"([ugoa]*)([+=-])([rwxXst]*)", clause)
        if m is None:
            return True  # unparsable: treat as unsafe
        who, op, perms = m.groups()
        if op in "+=" and "w" in perms and (not who or "o" in who or "a" in who):
            return True
    return False


def world_writable_chmods(text: str) -> list[str]:
    bad = []
    for words in _commands(text):
        if words[0] != "chmod":
            continue
        args = [w for w in words[1:] if not w.startswith("-")]
        if args and _others_can_write(args[0]):
            bad.append(" ".join(words))
    return bad


def shared_dir_grants(text: str) -> dict[str, dict[str, str]]:
    """``{dir: {"owner": "uid:gid", "mode": "0770"}}`` from the chown/chmod commands naming it."""
    grants: dict[str, dict[str, str]] = {}
    for words in _commands(text):
        if words[0] in ("chown", "chmod"):
            args = [w for w in words[1:] if not w.startswith("-")]
            for target in args[1:]:
                grants.setdefault(target, {})["owner" if words[0] == "chown" else "mode"] = args[0]
    return grants


def _all_text(path: Path) -> str:
    return "\n".join(s for doc in yaml.safe_load_all(path.read_text()) for s in _strings(doc))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_no_cluster_config_makes_anything_world_writable(path):
    assert world_writable_chmods(_all_text(path)) == []


def test_launcher_gives_the_shared_dirs_to_the_job_user_only():
    cfg = yaml.safe_load(AWS.read_text())
    text = "\n".join(cfg["initialization_commands"])
    grants = shared_dir_grants(text)
    for d in SHARED_DIRS:
        assert d in grants, f"{d}: no chown/chmod"
        owner, mode = grants[d].get("owner", ""), grants[d].get("mode", "")
        uid, _, gid = owner.partition(":")
        assert uid and uid not in ("0", "root") and gid, f"{d}: owner {owner!r}"
        assert re.fullmatch(r"0?[0-7]{3}", mode) and int(mode, 8) & 0o007 == 0, f"{d}: mode {mode!r}"
    assert "1777" not in AWS.read_text()


def test_the_checks_reject_the_old_line():
    assert world_writable_chmods(OLD_LINE) == ["chmod 1777 /mnt/shared/*"]
    assert shared_dir_grants(OLD_LINE).get(SHARED_DIRS[0]) is None  # the glob names no dir, no owner
    for mode, unsafe in [("1777", True), ("0777", True), ("o+w", True), ("a+rwx", True), ("+w", True),
                         ("u+w,o+w", True), ("0770", False), ("2770", False), ("700", False), ("go-w", False),
                         ("u+rwx", False), ("g=rwx", False)]:
        assert _others_can_write(mode) is unsafe, mode
