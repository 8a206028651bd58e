"""Shared fixtures: offline by construction, one local Ray cluster per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before anything imports ray / transformers / mlflow.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Every test session builds its caches (the tiny text encoder, registry downloads) from
# nothing, as a fresh machine does: a good copy in the home directory cannot hide a
# first-run failure. Ray workers started by the tests inherit this variable.
if "INSTALIGN_CACHE" not in os.environ:
    os.environ["INSTALIGN_CACHE"] = tempfile.mkdtemp(prefix="instalign-test-cache-")
    atexit.register(shutil.rmtree, os.environ["INSTALIGN_CACHE"], True)

import pytest  # noqa: E402
# Ray and Ray Data bind their log handlers to ``sys.stderr`` as it is when they are first
# imported. Imported here, at collection, that is the session's stream; imported first inside
# a test that uses ``capsys``, it would be that test's buffer, closed afterwards, and every
# later Ray Data log line would print "--- Logging error ---" and a traceback into some other
# test's output (measured: test_cli_errors then test_prepare_security).
import ray.data  # noqa: E402,F401


#: Fixtures that start (or need) a Ray cluster in this process: a test using one is a ``ray`` test.
RAY_FIXTURES = frozenset({"ray_local", "prepared_dataset", "small_store_ray"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: the marker must already be there
def pytest_collection_modifyitems(config, items):
    """Marks ``ray`` every test that uses a Ray fixture (directly or through another fixture), so
    ``-m "not ray"`` (``make test-fast``) never starts a cluster, whatever a test file forgot."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
    # Tests that shut the session's cluster down to run their own go last: run in file order, each
    # made the next ``ray_local`` user start the shared cluster again (~10-20 s a start here).
    items.sort(key=_owns_the_cluster)  # stable: file order otherwise


def _owns_the_cluster(item) -> bool:
    return item.get_closest_marker("own_cluster") is not None or "small_store_ray" in getattr(item, "fixturenames", ())


@pytest.fixture(autouse=True)
def _ray_only_in_ray_tests(request):
    """A test not marked ``ray`` that leaves Ray running in this process fails: it started a cluster
    (``ray.data`` starts one on first use) that ``make test-fast`` promises not to start."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    import ray

    before = ray.is_initialized()
    yield
    if not before and ray.is_initialized():
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked ray: add @pytest.mark.ray, "
                    "or check what it needs before Ray starts", pytrace=False)


@pytest.fixture(scope="session")
def _ray_session_guard():
    """Shuts Ray down once at the end of the session (if any test left it running)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session_guard):
    """A local Ray cluster (2 CPUs, dashboard on: Train/Tune need the State API).

    Started on first use and kept for the session; a test that needs its own cluster
    (multi-node) may ``ray.shutdown()`` it, marked ``own_cluster`` so that it runs after every
    user of this one (the next user would otherwise start it again).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=True,
                 dashboard_host="127.0.0.1")
    return ray


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized tensors: intra-op threads cost more than they give (measured on the 2-core box:
    ~0.1 s CPU per step with one thread, ~2 s CPU with two while other jobs compete)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cfg():
    from instalign.config import tiny

    return tiny()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset in the exact gRefCOCO on-disk layout."""
    from instalign.data.synthetic import generate_grefcoco

    root = tmp_path_factory.mktemp("synthetic_grefcoco")
    generate_grefcoco(root, num_images=24, seed=0)
    return root


@pytest.fixture(scope="session")
def prepared_dataset(synthetic_root, _ray_session_guard, tmp_path_factory):
    """``synthetic_root`` prepared into sharded Parquet with Ray Data."""
    import ray

    from pipelines.data.prepare import prepare_dataset

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=True,
                 dashboard_host="127.0.0.1")

    out = tmp_path_factory.mktemp("prepared") / "grefcoco"
    prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(out), rows_per_shard=8)
    return out


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_into_the_checkout():
    """A test that leaves ``mlruns/`` in the checkout has sent artifacts to MLflow's Default
    experiment, which a user's command would put in their current directory: fail the run."""
    mlruns = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mlruns")
    existed = os.path.exists(mlruns)
    yield
    assert existed or not os.path.exists(mlruns), (
        f"{mlruns} was written by this test run: some MLflow run or logged model went to the Default "
        "experiment (create experiments with pipelines.core.tracking.ensure_experiment)")
