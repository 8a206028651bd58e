"""Predictions for people and tables: ``predict`` (the verb: one image, or a table with ``--data``).

Holds: ``predict`` (the verb), ``batch`` (offline inference on Ray Data), its three stages
``decode`` (rows in, pixels out: Ray tasks), ``actor`` (the model's actor pool: pixels in,
answers out) and ``encode`` (answers in, RLE records out: Ray tasks), ``tables`` (what batch
prediction reads, hands between its stages and writes),
``batch_flags`` (its options, which ``predict`` defines without importing Ray).

May import: ``pipelines.core``, ``pipelines.data``, ``pipelines.models``.
"""
