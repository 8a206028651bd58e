"""Predictions for people and tables: ``predict`` (the verb: one image, or a table with ``--data``).

Holds: ``predict`` (the verb), ``batch`` (offline inference on Ray Data), ``actor`` (its
model actor: rows in, answers out), ``tables`` (what batch prediction reads and writes),
``batch_flags`` (its options, which ``predict`` defines without importing Ray).

May import: ``pipelines.core``, ``pipelines.data``, ``pipelines.models``.
"""
