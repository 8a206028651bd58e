"""Data in: an official release → sharded Parquet (``prepare``), Parquet → training samples (``loader``).

Holds: ``prepare`` (the ``instalign prepare`` verb) and its parts ``records`` (driver side:
check records, plan image tasks), ``shards`` (worker side: tasks → Parquet), ``output``
(where a dataset is built and how it replaces an old one); ``loader`` (prepared Parquet → a
Ray Dataset of samples); ``synthetic`` (the ``instalign synthetic`` verb); ``lineage`` (a
prepared dataset as an MLflow run input, for training and evaluation).

May import: ``pipelines.core``.
"""
