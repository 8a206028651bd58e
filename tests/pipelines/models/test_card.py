"""The model card and the run metrics linked to a logged model (``pipelines.models.card``),
against a real sqlite MLflow store."""

from __future__ import annotations

import pytest

from instalign.config import tiny
from pipelines.models.card import link_run_metrics, model_card


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished MLflow run with validation metrics (two points of val_gIoU), a slice and a command tag."""
    from mlflow import MlflowClient

    from pipelines.core.tracking import COMMAND_TAG, start_or_resume_run

    uri = f"sqlite:///{tmp_path_factory.mktemp('card') / 'mlflow.db'}"
    run_id, _ = start_or_resume_run(tracking_uri=uri, experiment="card-tests", run_name="card",
                                    tags={COMMAND_TAG: "instalign train --tracking-uri http://u:SECRET@host"})
    client = MlflowClient(tracking_uri=uri)
    for step, value in ((1, 20.0), (2, 41.25)):
        client.log_metric(run_id, "val_gIoU", value, step=step)
    for key, value in (("val_N_acc", 70.0), ("val_single.gIoU", 50.5), ("val_single.cIoU", 40.0),
                       ("val_single.samples", 12), ("train_loss", 3.0)):
        client.log_metric(run_id, key, value, step=2)
    return client, client.get_run(run_id)


def test_a_card_outside_a_run_says_data_and_metrics_are_unknown():
    card = model_card(tiny(), registered_model_name="shapes")
    assert "- unknown: logged outside a training run" in card and "None recorded with this model" in card
    assert "mlflow.pyfunc.load_model('models:/shapes@champion')" in card
    assert f"Texts longer than {tiny().model.text_encoder.max_tokens} tokens are refused" in card


def test_a_card_in_a_run_has_its_metrics_slices_and_a_redacted_command(run):
    _, logged = run
    card = model_card(tiny(), run=logged)
    assert "| gIoU | 41.25 |" in card and "| N_acc | 70 |" in card and "train_loss" not in card
    assert "| single | 50.50 | 40 | 12 |" in card
    assert logged.info.run_id in card and "SECRET" not in card
    assert "models:/<NAME>@<ALIAS>" in card


def test_the_runs_latest_val_metrics_are_linked_to_the_model_without_new_points(run):
    client, logged = run
    model_id = client.create_logged_model(logged.info.experiment_id, name="m",
                                          source_run_id=logged.info.run_id).model_id
    link_run_metrics(client, logged, model_id)
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert linked == {"val_gIoU": 41.25, "val_N_acc": 70.0, "val_single.gIoU": 50.5, "val_single.cIoU": 40.0,
                      "val_single.samples": 12.0}
    assert [m.value for m in client.get_metric_history(logged.info.run_id, "val_gIoU")] == [20.0, 41.25]
