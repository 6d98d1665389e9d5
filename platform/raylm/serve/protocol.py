"""The wire format of the serving API: OpenAI-compatible request bodies (unknown fields are
ignored, as OpenAI does), error bodies, and server-sent-event lines."""

import json
from typing import Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


# --- errors ------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers, self.param = \
            status, message, type_, code, headers, param


def error_body(message: str, type_: str, code: Optional[str], param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status, headers=e.headers)


def validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        param = param or loc or None
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts), param


# --- request bodies (OpenAI fields; unknown fields are ignored, as OpenAI does) -------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Optional[Union[str, list[str]]]


class CompletionRequest(_Body):
    model: str = Field(..., max_length=200)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    best_of: Optional[int] = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    stop: Stop = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    user: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None


class ChatRequest(_Body):
    model: str = Field(..., max_length=200)
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=5)
    user: Optional[str] = None


class ClassifyRequest(_Body):
    model: str = Field(..., max_length=200)
    texts: Union[str, list[str]] = Field(..., description="one text or up to 64")


class FeedbackRequest(_Body):
    response_id: str = Field(..., min_length=1, max_length=200)
    rating: int = Field(..., ge=-1, le=1, description="-1 bad, 0 neutral, 1 good")
    comment: str = Field("", max_length=4000)
    model: Optional[str] = Field(None, max_length=200)


def body_schema(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
