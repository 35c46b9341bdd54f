"""The server's errors: what a client gets back (``ApiError``, OpenAI's error shape) and what
stops the server from starting (``AdapterLoadError``).

Stdlib and Starlette only, so that every other module of the server can raise them.
"""

from __future__ import annotations

import re

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class AdapterLoadError(Exception):
    """An adapter of the model folder cannot be served: the server must not start."""


def ort_message(e: BaseException, limit: int = 300) -> str:
    """An onnxruntime error on one line, without the C++ source location and signature it starts with."""
    text = " ".join(str(e).split()) or type(e).__name__
    # "/onnxruntime_src/onnxruntime/lora/x.cc:93 const Foo* Bar(...) The buffer ..." -> "The buffer ..."
    text = re.sub(r"^\S+\.(?:cc|cpp|h):\d+ .*?\) (?=[A-Z])", "", text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if text.endswith((".", "!", "?")) else text + "."
