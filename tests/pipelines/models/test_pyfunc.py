"""The MLflow pyfunc: logged, registered, loaded by alias, equal to the Predictor; bad input refused.

A real sqlite tracking store per module (under tmp), a real (random, tiny) checkpoint, and
one fresh Python process that loads the model from the registry with nothing but MLflow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from tests.support.mlflow_store import tracking_store
from tests.support.images import noise_png as png_bytes
from tests.support.tiny_checkpoint import make_checkpoint

MODEL_NAME = "instalign-test-pyfunc"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite tracking store; MLflow's process-wide state restored afterwards."""
    with tracking_store(tmp_path_factory.mktemp("mlflow"), "pyfunc-tests") as uri:
        yield uri


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory):
    """(checkpoint dir, model version) — the checkpoint reports targets and instances (biased logits)."""
    from pipelines.models.registry import log_and_register

    ckpt = make_checkpoint(tmp_path_factory.mktemp("pyfunc") / "ckpt", score_bias=2.0, no_target_bias=-2.0)
    version = log_and_register(ckpt, registered_model_name=MODEL_NAME, alias="candidate")
    return ckpt, version


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """The directory this module's model may read ``image_path`` files from."""
    return tmp_path_factory.mktemp("served_images")


@pytest.fixture(scope="module")
def loaded(registered, image_root):
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate", model_config={"image_root": str(image_root)})


def test_registered_with_alias_signature_and_requirements(registered):
    import mlflow
    from mlflow import MlflowClient

    _, version = registered
    client = MlflowClient()
    assert client.get_model_version_by_alias(MODEL_NAME, "candidate").version == version.version
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@candidate")
    inputs = {c.name: c.required for c in info.signature.inputs.inputs}
    assert inputs == {"image": False, "image_path": False, "text": True}
    assert [c.name for c in info.signature.outputs.inputs] == ["mask", "no_target", "no_target_prob", "instances"]
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{MODEL_NAME}@candidate")
    text = open(reqs).read()
    assert "torch==" in text and "timm==" in text and "ray" not in text


def test_registration_run_and_logged_model_carry_no_credentials(store, tmp_path, monkeypatch):
    """MLflow tags a run and a logged model with the script path (``sys.argv[0]``) and the git
    remote on its own; both are redacted before they are stored."""
    import sys

    from mlflow import MlflowClient

    from pipelines.models.registry import log_and_register

    monkeypatch.setattr(sys, "argv", ["s3://AKIAKEY123:SeCrEt456@bucket/run.py?token=abc987xyz", "--x"])
    version = log_and_register(make_checkpoint(tmp_path / "ckpt"), registered_model_name=f"{MODEL_NAME}-redacted",
                               alias=None)
    client = MlflowClient()
    run = client.get_run(version.run_id)
    model = client.get_logged_model(version.source.split("/")[-1])  # models:/m-<id>
    stored = {**run.data.tags, **run.data.params, **model.tags, **model.params}
    assert stored["mlflow.source.name"] == "s3://***@bucket/run.py?token=***"
    assert not [k for k, v in stored.items() if any(s in v for s in ("AKIAKEY123", "SeCrEt456", "abc987xyz"))]


def test_predictions_equal_the_predictor(registered, loaded, image_root):
    from instalign.data.masks import rle_decode
    from instalign.predictor import Predictor

    ckpt, _ = registered
    path = image_root / "photo.png"
    path.write_bytes(png_bytes(90, 70, seed=2))
    frame = pd.DataFrame({
        "image": [png_bytes(64, 48, seed=1), None],
        "image_path": [None, "photo.png"],  # relative to the image root
        "text": ["the red circle on the left", "all blue squares"],
    })
    out = loaded.predict(frame)
    assert list(out.columns) == ["mask", "no_target", "no_target_prob", "instances"] and len(out) == 2

    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    expected = [predictor.predict(png_bytes(64, 48, seed=1), "the red circle on the left"),
                predictor.predict(str(path), "all blue squares")]
    for (_, row), pred in zip(out.iterrows(), expected):
        h, w = pred.mask.shape
        assert row["mask"]["size"] == [h, w]
        np.testing.assert_array_equal(rle_decode(row["mask"]["counts"], h, w), pred.mask)
        assert row["no_target"] == pred.no_target
        assert row["no_target_prob"] == pytest.approx(pred.no_target_prob, abs=1e-6)
        assert len(row["instances"]) == len(pred.instances) > 0
        for got, inst in zip(row["instances"], pred.instances):
            assert got["score"] == pytest.approx(inst.score, abs=1e-6)
            assert got["words"] == [w for w, _ in inst.words]
            np.testing.assert_array_equal(rle_decode(got["mask"]["counts"], h, w), inst.mask)
            ys, xs = np.nonzero(inst.mask)
            if len(xs):
                assert got["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    json.dumps(out.to_dict(orient="records"))  # what the REST server sends must be plain JSON

    # A served record carries everything needed to draw it again (quickstart's overlay).
    from pipelines.models.records import record_to_prediction

    back = record_to_prediction(out.iloc[1].to_dict())
    np.testing.assert_array_equal(back.mask, expected[1].mask)
    assert [(i.index, i.words) for i in back.instances] == \
        [(i.index, [(w, pytest.approx(v)) for w, v in i.words]) for i in expected[1].instances]


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"image": [b"not an image at all"], "text": ["the dog"]}),
     "row 0: 'image' bytes is not a readable image"),
    (pd.DataFrame({"image": [png_bytes(8, 8)], "text": ["   "]}), "row 0: 'text' must be a non-empty string"),
    (pd.DataFrame({"image_path": ["/nonexistent/x.png"], "text": ["the dog"]}),
     "row 0: image_path '/nonexistent/x.png' is not a readable image file under the server's image root"),
    (pd.DataFrame({"image": [None], "image_path": [None], "text": ["the dog"]}), "row 0: needs an 'image'"),
    (pd.DataFrame({"image": [png_bytes(8, 8), png_bytes(8, 8)],
                   "text": ["ok", " ".join(["the big red circle"] * 10)]}), "row 1: text"),
])
def test_bad_inputs_are_clear_errors(loaded, frame, message):
    from pipelines.models.pyfunc import PyfuncInputError

    with pytest.raises(PyfuncInputError, match=re.escape(message)):
        loaded.predict(frame)


def test_too_long_text_names_the_limit(loaded):
    from pipelines.models.pyfunc import PyfuncInputError

    long_text = " ".join(["the big red circle"] * 10)
    with pytest.raises(PyfuncInputError, match=r"longer than the model's limit of 20"):
        loaded.unwrap_python_model().predict(None, pd.DataFrame({"image": [png_bytes(8, 8)], "text": [long_text]}))


def test_missing_columns_are_clear_errors(loaded):
    from pipelines.models.pyfunc import PyfuncInputError, predict_records

    with pytest.raises(Exception, match="text"):
        loaded.predict(pd.DataFrame({"image": [png_bytes(8, 8)]}))
    predictor = loaded.unwrap_python_model().predictor
    with pytest.raises(PyfuncInputError, match="needs a column 'image'"):
        predict_records(predictor, pd.DataFrame({"text": ["the dog"]}))


def test_huge_image_is_refused_before_decoding(loaded, monkeypatch):
    import pipelines.models.pyfunc as pyfunc

    monkeypatch.setattr(pyfunc, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(pyfunc.PyfuncInputError, match=r"64x48 = 3072 pixels, above the limit of 3071"):
        loaded.unwrap_python_model().predict(None, pd.DataFrame({"image": [png_bytes(64, 48)], "text": ["a"]}))


def test_fresh_process_loads_by_alias_from_bundled_code(registered, store, tmp_path):
    """Another interpreter, another cwd: MLflow alone restores the model, from the code it bundled."""
    script = textwrap.dedent(f"""
        import io, json, sys
        import mlflow, pandas as pd
        from PIL import Image
        buf = io.BytesIO(); Image.new("RGB", (40, 30), (200, 20, 20)).save(buf, format="PNG")
        model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@candidate")
        out = model.predict(pd.DataFrame({{"image": [buf.getvalue()], "text": ["the red square"]}}))
        import pipelines.models.pyfunc, instalign
        print(json.dumps({{"size": out.iloc[0]["mask"]["size"], "pyfunc": pipelines.models.pyfunc.__file__,
                          "instalign": instalign.__file__}}))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["size"] == [30, 40]
    # The bundled sources (the model's code/ directory), not this checkout, served the request.
    for key in ("pyfunc", "instalign"):
        assert f"{os.sep}code{os.sep}" in result[key], result


@pytest.mark.slow
def test_rest_server_answers_and_refuses_clearly(registered, store, tmp_path):
    """``mlflow models serve --env-manager local`` on the alias: a prediction, and a 400 that names
    the problem without the server's stack trace."""
    import base64
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@candidate",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(payload):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the model server did not start"
                time.sleep(0.25)  # a refused /ping is cheap: answer as soon as it is up
        image = base64.b64encode(png_bytes(50, 40)).decode()
        status, body = post({"dataframe_split": {"columns": ["image", "text"], "data": [[image, "the red circle"]]}})
        assert status == 200 and body["predictions"][0]["mask"]["size"] == [40, 50]
        status, body = post({"dataframe_split": {"columns": ["image", "text"],
                                                 "data": [[base64.b64encode(b"junk").decode(), "a dog"]]}})
        assert status == 400
        assert "row 0: 'image' bytes is not a readable image" in body["message"]
        assert "stack_trace" not in body
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_logged_in_a_training_run_the_model_carries_a_card_metrics_and_a_described_version(store, tmp_path):
    """A "training" run (dataset input, val metrics) logs and registers its checkpoint: the
    logged model has MODEL_CARD.md (dataset, digest, metrics, how to call it) and the run's
    validation metrics; the version has a description and searchable tags."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.models.card import MODEL_CARD
    from pipelines.models.registry import log_and_register
    from pipelines.training.run_inputs import log_run_inputs
    from pipelines.core.tracking import MANIFEST_HASH_TAG, MlflowTracker, start_or_resume_run
    from instalign.config import tiny

    name = f"{MODEL_NAME}-card"
    manifest = {"format": "instalign-gres-parquet", "dataset": "grefcoco", "schema_version": 1,
                "counts": {"train": {"samples": 40}, "val": {"samples": 12}}}
    run_id, _ = start_or_resume_run(tracking_uri=store, experiment="pyfunc-tests", run_name="card-run")
    tracker = MlflowTracker(run_id=run_id, tracking_uri=store)
    log_run_inputs(tracker, tiny(), manifest, str(tmp_path / "prepared"), {"num_workers": 1})
    slices = {"val_single.gIoU": 38.5, "val_single.cIoU": 40.0, "val_single.samples": 8}  # one slice logged
    tracker.log_metrics({"val_gIoU": 41.25, "val_N_acc": 70.0, "val_T_acc": 55.5, "val_samples": 12, **slices}, step=7)
    version = log_and_register(make_checkpoint(tmp_path / "ckpt"), registered_model_name=name, alias="candidate",
                               run_id=run_id)

    client = MlflowClient()
    digest = client.get_run(run_id).data.tags[MANIFEST_HASH_TAG]
    card = open(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}/{MODEL_CARD}",
                                                    dst_path=str(tmp_path / "card"))).read()
    assert "`grefcoco` (digest `" + digest[:32] + "`)" in card
    assert "train: 40 samples" in card and "| gIoU | 41.25 |" in card and "| N_acc | 70 |" in card
    assert f"mlflow.pyfunc.load_model('models:/{name}@champion')" in card and "## Limits" in card
    assert "swin_tiny_patch4_window7_224" in card and run_id in card
    assert "| slice | gIoU | cIoU | samples |" in card and "| single | 38.50 | 40 | 8 |" in card
    assert "| multi |" not in card  # a slice the run did not log is not made up

    from pipelines.models.source import version_model_id

    model = client.get_logged_model(version_model_id(version))
    assert {m.key: m.value for m in model.metrics} == {"val_gIoU": 41.25, "val_N_acc": 70.0, "val_T_acc": 55.5,
                                                        "val_samples": 12, **slices}
    assert {m.dataset_name for m in model.metrics} == {"grefcoco"}
    assert [m.step for m in client.get_metric_history(run_id, "val_gIoU")] == [7]  # no duplicate point in the run

    assert version.tags["instalign.dataset_digest"] == digest and version.tags["instalign.run_id"] == run_id
    assert version.tags["metric.gIoU"] == "41.25" and version.tags["instalign.dataset"] == "grefcoco"
    assert "`grefcoco` (digest" in version.description and "| gIoU | 41.25 |" in version.description
    assert "no decision recorded" in version.description


def test_a_checkpoint_registered_outside_a_run_says_its_data_is_unknown(registered, tmp_path):
    import mlflow

    from pipelines.models.card import MODEL_CARD

    _, version = registered
    card = open(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{version.version}/{MODEL_CARD}",
                                                    dst_path=str(tmp_path))).read()
    assert "## Data" in card and "## Metrics" in card and "None recorded" in card
    assert "Data:** unknown" in version.description or "Metrics:** none recorded" in version.description
