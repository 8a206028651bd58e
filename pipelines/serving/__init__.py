"""A registered model behind Ray Serve: ``/invocations`` (MLflow's JSON protocol) and a page at ``/``.

Holds: ``serve`` (the verb and the Ray Serve application), ``guard`` (which requests reach
the model), ``invocation`` (the request body, parsed and bounded), ``bounded_json``,
``explain`` (the page's ``POST /explain``) and ``web/`` (the page).

May import: ``pipelines.core``, ``pipelines.models``.
"""
