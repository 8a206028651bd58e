"""Training on Ray Train: one job core (``job``) that ``instalign train`` and every Tune trial run.

Holds: ``train`` (the verb), ``job`` (a training job assembled and run), ``worker`` (one
Ray Train worker: the step loop), ``observers`` (what watches the loop: progress,
tracking, overlays, checkpoints), ``resume``, ``run_inputs``, ``progress``, ``system_metrics``.

May import: ``pipelines.core``, ``pipelines.data``, ``pipelines.models``.
"""
