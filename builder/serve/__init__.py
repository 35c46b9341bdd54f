"""The model server that runs in the runtime images (``python -m builder.serve``): an
OpenAI-compatible API over onnxruntime-genai. It imports only the standard library,
Starlette, uvicorn, prometheus_client, numpy and onnxruntime_genai, plus ``builder.contract``
and ``builder.errors``: the runtime images carry this package, ``builder/__init__.py``,
``builder/contract.py`` and ``builder/errors.py`` (stdlib only), nothing else of olive-builder.

``builder.serve.app.run`` serves a model folder (``build serve`` calls it); ``app``'s docstring
maps the package's modules."""
