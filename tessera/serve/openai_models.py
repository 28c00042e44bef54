"""Request bodies of the OpenAI endpoints (pydantic, validated by FastAPI).

Ranges are checked by ``SamplingParams`` (one source of truth for the messages) and the
server's limits (``limits.py``); here only shapes and types are declared, and non-finite
numbers (``NaN``, ``Infinity``, ``1e999``) are refused wherever a number goes. Unknown fields
are ignored, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tessera.sampling_params import SamplingParams
from tessera.structured.spec import StructuredOutputs

_Metadata = dict[
    Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]
]


class _Body(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


MAX_TOOLS = 128
"""OpenAI's limit on the tools of one request."""
_FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class JSONSchemaFormat(_Body):
    """``response_format.json_schema``."""

    model_config = ConfigDict(allow_inf_nan=False, populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(_Body):
    """vLLM's ``structured_outputs``: exactly one of these (see ``StructuredOutputs``)."""

    model_config = ConfigDict(allow_inf_nan=False, populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(_Body):
    """Fields shared by both endpoints, plus vLLM's extras (top_k, min_p, ...)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: _Metadata | None = Field(default=None, max_length=16)
    """Accepted and ignored, like ``user``; bounded as OpenAI bounds it (16 pairs)."""
    # vLLM extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    """Add ``prompt_token_ids`` and per-choice ``token_ids`` to the response."""
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = None
    """Per prompt token, its logprob and this many alternatives (not with ``stream``)."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutputs | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Validated params; raises ValueError with SamplingParams' message for a bad value.
        ``prompt_logprobs`` is what the engine computes (the endpoint may need more than the
        body's field asks)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids (integers as strings)") from None
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop or None,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=bias,
            structured=structured,
        )


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: a string, a list of strings, or token ids (one or a list)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant message's calls, as OpenAI returned them."""
    tool_call_id: str | None = None
    """A ``tool`` message's answer to this call."""


class FunctionDefinition(_Body):
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[ChatTool] | None) -> list[ChatTool] | None:
        names = [t.function.name for t in tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool function names must be unique")
        return tools
