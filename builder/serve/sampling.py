"""What one generation takes (``Sampling``) and gives (``Piece`` per token, ``Finished`` at the
end): the types the request parser, the two generation paths and the scheduler share."""

from __future__ import annotations

from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1


@dataclass
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    min_tokens: int = 0  # vLLM's extension
    repetition_penalty: float | None = None  # vLLM's extension
    guidance: tuple[str, str] | None = None  # (kind, spec) for onnxruntime-genai's set_guidance
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Piece:
    """The text one generated token adds (possibly empty: a partial UTF-8 character), and its log-probabilities."""

    text: str
    token: int = -1
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int
    cached_tokens: int = 0


def seed32(seed: int) -> int:
    """onnxruntime-genai takes a 32-bit seed; OpenAI's is 64-bit: fold it, deterministically."""
    return seed % (INT32_MAX + 1)


# What a generation hands to its reader: a piece per token, then one end (finished or failed).
Output = Piece | Finished | BaseException
