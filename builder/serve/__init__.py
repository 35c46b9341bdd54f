"""The model server that runs in the runtime images (``python -m builder.serve``): an
OpenAI-compatible API over onnxruntime-genai. It imports only the standard library,
Starlette, uvicorn, prometheus_client, numpy and onnxruntime_genai, plus ``builder.contract``:
the runtime images carry this package, ``builder/__init__.py`` and ``builder/contract.py``,
nothing else of olive-builder."""
