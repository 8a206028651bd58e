"""What a logged InstAlign model says about itself: ``MODEL_CARD.md`` and its run's metrics.

Logged inside a training run, the model carries that run's story (``pipelines.models.pyfunc.log_model``
writes both): ``MODEL_CARD.md`` beside ``MLmodel`` says what the model is, the data it was
trained on, its metrics, its limits and how to call it (:func:`model_card`), and the run's
validation metrics are linked to the logged model (MLflow 3 ``LoggedModel`` metrics, with the
dataset they were measured on; :func:`link_run_metrics`).
"""

from __future__ import annotations

import json

from mlflow.entities import Metric

from instalign.metrics import SLICES
from pipelines.core.redaction import redact
from pipelines.core.tracking import COMMAND_TAG, GIT_COMMIT_TAG, MANIFEST_HASH_TAG, metric_key

#: The model card's file name inside the logged model (beside ``MLmodel``).
MODEL_CARD = "MODEL_CARD.md"
#: Metric keys of a training run linked to its logged model and shown on the card.
_CARD_METRICS = ("val_gIoU", "val_cIoU", "val_N_acc", "val_T_acc", "val_Pr@0.7", "val_Pr@0.8", "val_Pr@0.9",
                 "val_nt_AUROC", "val_samples")
#: The slices' metrics (``instalign.metrics.SLICES``): in the card's second table, linked to the model too.
_SLICE_METRICS = tuple(f"val_{name}.{m}" for name in SLICES for m in ("gIoU", "cIoU", "samples"))


def _fmt_metric(value: float) -> str:
    return "n/a" if value != value else (f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}")


def _slice_table(logged: dict[str, float]) -> list[str]:
    """gIoU / cIoU per kind of sample (``instalign.metrics.SLICES``) from the run's ``val_*`` metrics."""
    rows = [(name, [logged.get(metric_key(f"val_{name}.{m}")) for m in ("gIoU", "cIoU", "samples")])
            for name in SLICES]
    rows = [(name, values) for name, values in rows if values[2] is not None]
    if not rows:
        return []
    return ["", "By kind of sample (single-, multi- and no-target expressions; docs/metrics.md):", "",
            "| slice | gIoU | cIoU | samples |", "|---|---|---|---|"] + [
        f"| {name} | {_fmt_metric(g) if g is not None else 'n/a'} | {_fmt_metric(c) if c is not None else 'n/a'} "
        f"| {int(n)} |" for name, (g, c, n) in rows]


def model_card(cfg, *, run=None, registered_model_name: str | None = None) -> str:
    """``MODEL_CARD.md``: what the model is, its data, metrics, limits and how to call it.

    Args:
        cfg: the checkpoint's ``instalign.config.Config``.
        run: the MLflow run the model is logged in (``mlflow.entities.Run``), if any: the
            dataset comes from its inputs (name, digest, counts) and tags, the metrics from its
            ``val_*`` metrics. Without one, the card says the data and metrics are unknown.
        registered_model_name: for the "how to call it" lines.
    """
    m = cfg.model
    uri = f"models:/{registered_model_name}@champion" if registered_model_name else "models:/<NAME>@<ALIAS>"
    lines = [
        "# InstAlign model card",
        "",
        "## What it is",
        "InstAlign (instance-aware generalized referring expression segmentation): given an image and a "
        "referring expression, it segments every object the expression refers to — one, several, or none "
        "(then it predicts *no target*, p̂_nt > 0.5, and an empty mask). Queries are aligned to the "
        "expression's phrases (paper eq. 1) and the kept instances are merged into one mask (eq. 8).",
        "",
        f"- backbone: `{m.backbone.name}`, text encoder: `{m.text_encoder.name}` (max {m.text_encoder.max_tokens} "
        f"tokens including special tokens)",
        f"- input resolution {m.image_size}, {m.num_queries} instance queries, {m.num_blocks} decoder blocks "
        f"(`{m.decoder}`), hidden size {m.hidden_dim}, aggregation `{m.aggregation}`, no-target input "
        f"`{m.no_target_input}`",
        f"- trained for {cfg.train.epochs} epoch(s), batch size {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
        f"seed {cfg.train.seed}",
        "",
        "## Data",
    ]
    metrics: dict[str, float] = {}
    if run is not None:
        tags = run.data.tags
        datasets = [d for d in run.inputs.dataset_inputs
                    if any(t.key == "mlflow.data.context" and t.value == "train" for t in d.tags)]
        for d in datasets:
            profile = json.loads(d.dataset.profile or "{}")
            source = json.loads(d.dataset.source or "{}").get("uri", d.dataset.source)
            lines.append(f"- `{d.dataset.name}` (digest `{d.dataset.digest}`) from `{source}`")
            for split, counts in sorted((profile.get("counts") or {}).items()):
                lines.append(f"  - {split}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
            if profile.get("quarantined"):
                lines.append(f"  - quarantined while preparing: {profile['quarantined']}")
        if not datasets:
            lines.append(f"- `{tags.get('instalign.dataset', 'unknown')}` (manifest sha256 "
                         f"`{tags.get(MANIFEST_HASH_TAG, 'unknown')}`)")
        lines += ["", f"Training run `{run.info.run_id}` (git `{tags.get(GIT_COMMIT_TAG, 'unknown')}`), made by "
                      f"`{redact(tags.get(COMMAND_TAG, 'unknown command'))}`."]
        metrics = {k: run.data.metrics[metric_key(k)] for k in _CARD_METRICS if metric_key(k) in run.data.metrics}
    else:
        lines.append("- unknown: logged outside a training run (`instalign register --checkpoint`).")
    lines += ["", "## Metrics"]
    if metrics:
        lines += ["Validation at the training run's last evaluation (gRefCOCO semantics, percentages; the paper's "
                  "no-target threshold 0.5):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('val_')} | {_fmt_metric(v)} |" for k, v in metrics.items()]
        lines += _slice_table(run.data.metrics)
    else:
        lines.append("None recorded with this model; `instalign evaluate --model models:/NAME/VERSION` logs an "
                     "evaluation run linked to it.")
    lines += [
        "",
        "## Limits",
        f"- Texts longer than {m.text_encoder.max_tokens} tokens are refused, not truncated; images above the "
        "serving limits (pixels, bytes; `pipelines.models.limits.ServingLimits`) are refused.",
        "- Masks are predicted at the input resolution and resized to the image: thin structures lose detail.",
        "- The no-target decision is a fixed threshold (0.5) on p̂_nt; its accuracy (N-acc) depends on how "
        "often the training data had no-target expressions.",
        "- Quality is only what the metrics above say, on the data above: a model trained on a small or "
        "synthetic dataset (the quickstart) is a demonstration, not a usable segmenter.",
        "",
        "## How to call it",
        "```python",
        "import mlflow, pandas as pd",
        f"model = mlflow.pyfunc.load_model({uri!r})",
        'out = model.predict(pd.DataFrame({"image": [open("photo.jpg", "rb").read()], "text": ["the two dogs"]}))',
        'out.loc[0, "mask"]  # COCO RLE; also no_target, no_target_prob, instances',
        "```",
        f"Command line: `instalign predict --model {uri} --image photo.jpg --text \"the two dogs\"`; a server: "
        f"`instalign serve --model {uri}` or `mlflow models serve -m {uri} --env-manager local`.",
    ]
    return "\n".join(lines) + "\n"


def link_run_metrics(client, run, model_id: str) -> None:
    """Re-log the run's latest ``val_*`` metrics with ``model_id`` (and the training dataset),
    so they show on the logged model (MLflow 3). Each is the same point (key, value, step,
    timestamp) as in the run's history, which therefore gains no new points."""
    keys = {metric_key(k) for k in _CARD_METRICS + _SLICE_METRICS}
    train = [d.dataset for d in run.inputs.dataset_inputs
             if any(t.key == "mlflow.data.context" and t.value == "train" for t in d.tags)]
    name, digest = (train[0].name, train[0].digest) if train else (None, None)
    latest = [max(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
              for key in sorted(keys & set(run.data.metrics))]
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=name, dataset_digest=digest)
              for m in latest]
    if linked:
        client.log_batch(run.info.run_id, metrics=linked)
