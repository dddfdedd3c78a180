"""Request schemas of the OpenAI endpoints, and OpenAI-style error bodies.

Only the fields this server honours are declared; other fields clients commonly send are
accepted and ignored, except those whose silent omission would change the answer
(``logprobs``, ``echo``, ``suffix``, ``tools``, ``best_of``): those are refused.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered with an OpenAI error body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> Dict[str, Any]:
        # Messages may quote client text; text that is not valid Unicode (a lone surrogate)
        # would fail the response's UTF-8 encoding, so it is escaped.
        def safe(text: Optional[str]) -> Optional[str]:
            return None if text is None else str(text).encode("utf-8", "backslashreplace").decode("utf-8")

        return {"error": {"message": safe(self.message), "type": self.type, "param": safe(self.param),
                          "code": self.code}}


UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "best_of",
               "response_format", "logit_bias")


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None

    def stops(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be at most 4 non-empty strings", "stop")
        return stops

    def refuse_unsupported(self) -> None:
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if value is None or value is False or (name == "best_of" and value == 1):
                continue
            raise APIError(400, f"{name} is not supported by this server", name,
                           "unsupported_parameter")


class CompletionRequest(Sampling):
    prompt: Union[str, List[str]]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def validation_error(errors: List[Dict[str, Any]]) -> APIError:
    """A pydantic / FastAPI validation error as a 400 naming the first offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")),
                        None, "invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param, "missing_required_parameter" if first.get("type") == "missing"
                    else "invalid_value")
