"""The documentation works as written (issue 13): what a user copies from it runs.

Read from the shipped files — README.md, cluster/README.md, docs/*.md and the comments and
entrypoints of cluster/**/*.yaml:

* every ``instalign train`` / ``instalign tune`` example passes ``--name`` (the same name
  resumes a run, so a cluster example without one is a trap), and every ``instalign VERB``
  example is accepted by the real CLI parser;
* every Python snippet parses, and every module-like name it reads an attribute of
  (``pd.DataFrame``) is imported or assigned in the snippet;
* every dotted config key the docs name (`` `loss.nt_weight` ``) exists in ``Config``;
* every relative link points at a file that exists;
* the GPU node types of the cluster configs are the GPU the cost tables are computed for.

Each check is also run on a small broken text, so none of them passes vacuously.
"""

from __future__ import annotations

import ast
import builtins
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import VERBS
from tests.support.cluster_config import CLUSTER_DIR, REPO, check_entrypoint, entrypoint_commands, load_documents

DOCS = [REPO / "README.md", CLUSTER_DIR / "README.md", *sorted((REPO / "docs").glob("*.md"))]
YAMLS = sorted(CLUSTER_DIR.rglob("*.yaml"))
SEPARATORS = ("--", "&&", "||", ";", "|")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --- extraction -------------------------------------------------------------------------------

def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, body, first line number)`` of every fenced code block of a Markdown text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((m.group(1).lower(), "\n".join(body), start + 1))
        i += 1
    return blocks


def logical_lines(lines: list[str]) -> list[str]:
    """Join backslash-continued shell lines."""
    out, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    if current:
        out.append(current)
    return out


def instalign_commands(line: str) -> list[list[str]]:
    """The ``instalign VERB ...`` commands of one shell line, wherever they start
    (line start, after ``--`` of ``ray job submit``, after ``&&`` / ``;``)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # a quote opened on another line (JSON in --overrides): not a command line
        return []
    found = []
    for i, tok in enumerate(tokens):
        if tok == "instalign" and i + 1 < len(tokens) and tokens[i + 1] in VERBS and (i == 0 or tokens[i - 1] in SEPARATORS):
            end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in SEPARATORS[1:]), len(tokens))
            found.append(tokens[i:end])
    return found


def doc_commands(path: Path, text: str | None = None) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every instalign command in a Markdown file's shell blocks."""
    text = path.read_text() if text is None else text
    out = []
    for lang, body, lineno in fenced_blocks(text):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in logical_lines(body.splitlines()):
            out.extend((f"{_rel(path)} (block at line {lineno})", argv) for argv in instalign_commands(line))
    return out


def yaml_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Commands in a cluster YAML: RayJob entrypoints and the examples in its comments."""
    out = []
    for doc in load_documents(path):
        entry = (doc.get("spec") or {}).get("entrypoint") if isinstance(doc, dict) else None
        if entry:
            out.extend((f"{_rel(path)} entrypoint", argv) for argv in entrypoint_commands(entry)
                       if argv[0] == "instalign")
    comments = [line.strip()[1:] for line in path.read_text().splitlines() if line.strip().startswith("#")]
    for line in logical_lines(comments):
        out.extend((f"{_rel(path)} comment", argv) for argv in instalign_commands(line))
    return out


def all_commands() -> list[tuple[str, list[str]]]:
    return [c for p in DOCS for c in doc_commands(p)] + [c for p in YAMLS for c in yaml_commands(p)]


def python_snippets(path: Path, text: str | None = None) -> list[tuple[str, str]]:
    text = path.read_text() if text is None else text
    return [(f"{_rel(path)} (block at line {lineno})", body) for lang, body, lineno in fenced_blocks(text)
            if lang in ("python", "py")]


def undefined_attribute_bases(source: str) -> list[str]:
    """Names used as ``NAME.attr`` that the snippet never binds (import, assignment, def, loop...)."""
    tree = ast.parse(source)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    used = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    return sorted(used - bound)


CONFIG_KEY = re.compile(r"`((?:model|loss|data|train)(?:\.[A-Za-z_]\w*)+)(?:\s*[=:][^`]*)?`")


def config_keys(text: str) -> set[str]:
    """Dotted config keys named in backticks (`` `model.num_queries` ``, `` `loss.nt_weight=0.2` ``)."""
    files = (".py", ".yaml", ".yml", ".md", ".json", ".safetensors", ".parquet", ".db", ".txt")
    return {k for k in CONFIG_KEY.findall(text) if not k.endswith(files)}


def known_config_keys() -> set[str]:
    from instalign.config import Config

    keys = set(Config().flat())
    return keys | {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}


LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def broken_links(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    return [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")
            and not (path.parent / t).exists()]


# --- the shipped docs ---------------------------------------------------------------------------

def unlinked_pages(readme: str, pages: list[Path]) -> list[str]:
    """The docs pages README does not link to (a page no one can find is a page lost)."""
    return [p.name for p in pages if f"(docs/{p.name})" not in readme]


def test_docs_exist_and_readme_points_to_them():
    readme = (REPO / "README.md").read_text()
    pages = sorted((REPO / "docs").glob("*.md"))
    for name in ("model", "objective", "data", "metrics", "architecture", "security", "performance"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name
    assert not unlinked_pages(readme, pages), f"docs pages README does not link: {unlinked_pages(readme, pages)}"
    assert "shared/DESIGN.md" not in readme  # users do not have the internal design file
    assert all_commands(), "no instalign command found in the docs: the extraction is broken"


def test_every_train_and_tune_example_has_a_name():
    missing = [f"{where}: {shlex.join(argv)}" for where, argv in all_commands()
               if argv[1] in ("train", "tune") and "--name" not in argv]
    assert not missing, "train/tune examples without --name (the same name resumes a run):\n" + "\n".join(missing)


def test_every_instalign_example_parses_with_the_real_cli():
    commands = all_commands()
    assert {argv[1] for _, argv in commands} >= {"prepare", "train", "tune"}
    for where, argv in commands:
        check_entrypoint(shlex.join(argv), where)


def test_python_snippets_import_what_they_use():
    snippets = [s for p in DOCS for s in python_snippets(p)]
    assert snippets
    problems = []
    for where, source in snippets:
        try:
            missing = undefined_attribute_bases(source)
        except SyntaxError as e:
            problems.append(f"{where}: does not parse: {e}")
            continue
        if missing:
            problems.append(f"{where}: uses {missing} without importing or assigning them")
    assert not problems, "\n".join(problems)


def test_config_keys_named_in_the_docs_exist():
    known = known_config_keys()
    unknown = sorted({f"{_rel(p)}: {k}" for p in DOCS for k in config_keys(p.read_text()) if k not in known})
    assert not unknown, "config keys that instalign.config.Config does not have:\n" + "\n".join(unknown)


def test_relative_links_resolve():
    broken = [f"{_rel(p)}: {t}" for p in DOCS for t in broken_links(p)]
    assert not broken, broken


def _gpu_of_instance(instance_type: str) -> str:
    family = instance_type.split(".")[0]
    gpus = {"p5": "H100", "p5e": "H200", "p5en": "H200", "p4d": "A100", "p4de": "A100", "g5": "A10G",
            "g6": "L4", "g6e": "L40S", "p3": "V100"}
    if family not in gpus:
        pytest.fail(f"unknown GPU instance family {instance_type!r}: add it to this table")
    return gpus[family]


def cost_table_gpu(texts: list[str]) -> str | None:
    """The GPU model of the search cost table (``| item | GPU-hours (H100) |``) in any of the texts."""
    found = [m.group(1) for text in texts for m in [re.search(r"GPU-hours \((\w+)\)", text)] if m]
    return found[0] if found else None


def test_cluster_node_types_match_the_cost_tables():
    """The GPU the docs' cost table is computed for is the GPU every training config asks for."""
    gpu = cost_table_gpu([p.read_text() for p in DOCS])
    assert gpu, "the cost table (GPU-hours per GPU model) not found in README.md or docs/"
    cluster_readme = (CLUSTER_DIR / "README.md").read_text()
    node_table = cluster_readme.split("## Node types and cost", 1)[-1].split("\n## ", 1)[0]
    assert gpu in node_table, f"cluster/README.md's node table does not name the {gpu} of the cost table"

    (launcher,) = load_documents(CLUSTER_DIR / "aws-gpu.yaml")
    for name, node in launcher["available_node_types"].items():
        if node["resources"].get("GPU", 0) > 0:
            itype = node["node_config"]["InstanceType"]
            assert _gpu_of_instance(itype) == gpu, f"aws-gpu.yaml {name}: {itype} is not an {gpu} instance"
            assert f"`{itype}`" in node_table, f"cluster/README.md's node table does not name {itype}"
    for path in sorted((CLUSTER_DIR / "kuberay").glob("ray*.yaml")):
        (doc,) = load_documents(path)
        if doc["kind"] not in ("RayJob", "RayCluster"):  # the clusters that train (not a serving RayService)
            continue
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            if int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0:
                product = (pod.get("nodeSelector") or {}).get("nvidia.com/gpu.product", "")
                assert gpu in product, f"{_rel(path)} group {group['groupName']}: nodeSelector {product!r} is not {gpu}"


# --- each check catches the mistake it is for --------------------------------------------------

BROKEN_MD = """
Train it:

```bash
instalign train --config paper --data /d \\
    --num-workers 2 model.num_queries=50
ray job submit --working-dir . -- instalign tune --space s.yaml --data /d --name ok
```

```python
import mlflow
model = mlflow.pyfunc.load_model("models:/m@champion")
model.predict(pd.DataFrame({"text": ["x"]}))
```

Set `loss.no_such_weight` or `model.num_queries=50` (in `model.safetensors`); see [the model](docs/nowhere.md).
"""


def test_the_checks_catch_their_mistakes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(BROKEN_MD)
    commands = {argv[1]: argv for _, argv in doc_commands(page, BROKEN_MD)}
    assert "--name" not in commands["train"] and "--name" in commands["tune"]
    assert commands["train"][-1] == "model.num_queries=50"  # continuation lines joined
    ((_, source),) = python_snippets(page, BROKEN_MD)
    assert undefined_attribute_bases(source) == ["pd"]
    assert undefined_attribute_bases("import pandas as pd\n" + source) == []
    with pytest.raises(SyntaxError):
        undefined_attribute_bases("def broken(:\n")
    keys = config_keys(BROKEN_MD)
    assert keys == {"loss.no_such_weight", "model.num_queries"}
    assert keys - known_config_keys() == {"loss.no_such_weight"}
    assert broken_links(page, BROKEN_MD) == ["docs/nowhere.md"]
    assert _gpu_of_instance("g5.2xlarge") == "A10G" != _gpu_of_instance("p5.4xlarge")
    assert unlinked_pages("see [the model](docs/model.md)", [Path("model.md"), Path("data.md")]) == ["data.md"]
    assert cost_table_gpu(["no table", "| item | GPU-hours (A100) |"]) == "A100"
    assert cost_table_gpu(["no table"]) is None
