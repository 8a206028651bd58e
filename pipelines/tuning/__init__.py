"""Hyper-parameter search on Ray Tune: each trial is one training job (``pipelines.training.job``).

Holds: ``tune`` (the verb), ``space`` (search spaces from ``tune_spaces/``), ``trial`` (one
trial as an MLflow child run), ``report`` (the trial table, plot and the best model), ``table3`` (a ``search: rows``
space as the paper's Table 3: mean ± std over seeds, Δ to the reference row).

May import: ``pipelines.core``, ``pipelines.data``, ``pipelines.models``, ``pipelines.training``.
"""
