"""InstAlign's orchestration: Ray Data, Ray Train, Ray Tune, Ray Serve and MLflow around ``instalign``.

The folders are the stages, in the order a model lives through them; each ``__init__``
says what it holds and what it may import (``tests/pipelines/test_import_graph.py``
holds the code to it)::

    core/        Ray connection, resources, MLflow tracking, flags, redaction
    data/        prepare (release → Parquet), the training loader, synthetic data
    models/      the MLflow pyfunc, registry versions, model sources
    training/    the training job core and its Ray Train worker
    tuning/      Ray Tune searches over training jobs
    evaluation/  evaluate and promote
    inference/   predict: one image, or a table on Ray Data
    serving/     Ray Serve and the page
    bench/       benchmarks (nothing imports them)

``cli`` routes each ``instalign`` verb to its stage; ``quickstart`` runs them all.
"""
