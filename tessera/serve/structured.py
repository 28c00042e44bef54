"""A request's ``response_format`` or ``structured_outputs`` as the engine's constraint.

Checked here, in the API process, so a schema the grammar engine cannot compile is a 400
naming the problem before anything reaches the engine core.
"""

from __future__ import annotations

import json

from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest, CompletionRequest
from tessera.serve.prompts import off_loop
from tessera.structured.grammar import GrammarError, check_grammar
from tessera.structured.spec import StructuredOutputs


def requested_constraint(
    body: CompletionRequest | ChatCompletionRequest,
) -> tuple[StructuredOutputs | None, str]:
    """The constraint the body asks for (None: none) and the field it came from."""
    fmt, extra = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text" and extra is not None:
        raise APIError(400, "use either response_format or structured_outputs, not both",
                       param="structured_outputs")
    try:
        if extra is not None:
            schema = extra.json_
            return StructuredOutputs(
                json=json.dumps(schema, sort_keys=True) if isinstance(schema, dict) else schema, json_object=bool(extra.json_object), regex=extra.regex,
                choice=tuple(extra.choice) if extra.choice is not None else None,
                grammar=extra.grammar,
            ), "structured_outputs"
        if fmt is None or fmt.type == "text":
            return None, ""
        if fmt.type == "json_object":
            return StructuredOutputs(json_object=True), "response_format"
        spec = fmt.json_schema
        if spec is None or spec.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format")
        return StructuredOutputs.json_schema(spec.schema_, strict=bool(spec.strict)), \
            "response_format"
    except ValueError as e:
        raise APIError(400, str(e), param="structured_outputs" if extra else "response_format") \
            from None


async def check_constraint(spec: StructuredOutputs | None, param: str) -> None:
    """400 naming the problem if the grammar engine cannot compile ``spec``."""
    if spec is None:
        return
    try:
        await off_loop(check_grammar, spec, None)
    except GrammarError as e:
        raise APIError(400, str(e), param=param) from None
