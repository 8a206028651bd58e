"""What a trained model is outside training: the MLflow pyfunc, its registry versions, where it comes from.

Holds: ``source`` (a directory, ``runs:/`` or ``models:/`` URI → a local checkpoint),
``pyfunc`` (InstAlign as an MLflow pyfunc model) and ``limits`` (its serving boundary),
``registry`` (registered versions: log and register, describe, aliases), ``register``
(the ``instalign register`` verb), ``card`` (the model card), ``records`` (one answer as
JSON-ready data).

May import: ``pipelines.core``.
"""
