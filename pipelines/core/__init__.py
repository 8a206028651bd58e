"""What every stage stands on: the Ray connection, resources, MLflow tracking, flags, redaction.

Holds: ``ray_cluster`` (one way to connect to Ray), ``ray_logs`` (what Ray's logs show), ``resources`` (CPUs, GPUs, storage),
``tracking`` (MLflow behind ``instalign.tracking.Tracker``), ``flags`` (command-line flags
shared by the verbs), ``redaction`` (credentials never written down), ``output_dirs`` (the
one ``--out`` rule), ``forked`` (one call in a forked child).

May import: ``instalign`` and the libraries; no other package of ``pipelines``.
"""
