"""olive-builder: build Hugging Face models into checked ONNX Runtime GenAI models with Olive.

Kept free of imports: ``builder.build.worker`` and ``builder.build.check`` run inside builder images
that have neither click nor pydantic installed.
"""

__version__ = "0.1.0"
