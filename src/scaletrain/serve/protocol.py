"""OpenAI API request schemas, their checks, and OpenAI-style errors.

Status codes: 400 for a malformed body or a value out of range (as OpenAI and
vLLM do), 422 for a body that does not fit the schema (a missing field, a
wrong type), 401 for a missing or wrong API key, 404 for an unknown model,
429 past the queue limit. Every error body is
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scaletrain.serve.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16
MAX_STOP = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


def parse(model: type[BaseModel], body: bytes):
    """The request, or an APIError: 400 for bad JSON, 422 for a schema mismatch."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}", None, "invalid_json")
        if first["type"] == "model_type":  # e.g. a JSON array or string instead of an object
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        raise APIError(422, f"{param}: {first['msg']}", param, first["type"]) from None


def sampling_params(req: _Request, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """Range checks (400) and the engine's sampling parameters."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    checks = [
        (max_tokens >= 1, "max_tokens", f"max_tokens must be at least 1, got {max_tokens}"),
        (temperature >= 0.0, "temperature", f"temperature must be >= 0, got {temperature}"),
        (0.0 < top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {top_p}"),
        (top_k >= 0, "top_k", f"top_k must be -1 (all), 0 (all) or positive, got {req.top_k}"),
        (1 <= req.n <= MAX_N, "n", f"n must be in 1..{MAX_N}, got {req.n}"),
        (len(stop) <= MAX_STOP and all(stop), "stop", f"stop: at most {MAX_STOP} non-empty strings"),
        (logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs", f"logprobs must be in 0..{MAX_LOGPROBS}"),
        (req.presence_penalty == 0.0, "presence_penalty", "presence_penalty is not supported (only 0)"),
        (req.frequency_penalty == 0.0, "frequency_penalty", "frequency_penalty is not supported (only 0)"),
    ]
    for ok, param, message in checks:
        if not ok:
            raise APIError(400, message, param, "invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=req.seed,
                          stop=stop, logprobs=logprobs, ignore_eos=req.ignore_eos)


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """max_tokens (the rest of the context when None); a 400 if prompt + max_tokens do not fit."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
    requested = max_model_len - prompt_len if max_tokens is None else max_tokens
    if requested < 1 and max_tokens is not None:
        return requested  # sampling_params reports it
    if prompt_len + max(requested, 1) > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_len + max(requested, 1)} tokens ({prompt_len} in the prompt, "
                            f"{max(requested, 1)} for the completion). Please reduce the length of the prompt "
                            "or max_tokens.", "max_tokens", "context_length_exceeded")
    return requested
