"""Judging a model: ``evaluate`` (metrics on a prepared split) and ``promote`` (``@champion`` by a rule).

May import: ``pipelines.core``, ``pipelines.data``, ``pipelines.models``.
"""
