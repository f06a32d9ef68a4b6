"""What a request's ``response_format`` or vLLM ``guided_*`` option asks for, as the engine's
``StructuredOutputParams``; checked here (llguidance needs no tokenizer for that) so a bad schema is a 400
naming its field before any worker sees it.
"""

from __future__ import annotations

import json
from typing import Any

from longserve.engine.grammar_spec import check_structured_output
from longserve.engine.sampling_params import StructuredOutputParams
from longserve.serve.errors import APIError
from longserve.serve.protocol import SamplingRequest


def requested_structure(req: SamplingRequest) -> StructuredOutputParams | None:
    """The one constraint ``req`` asks for, or None; two at once, or an invalid one, is a 400."""
    asked: list[tuple[str, StructuredOutputParams]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", StructuredOutputParams(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(
                "response_format of type json_schema needs json_schema.schema",
                param="response_format.json_schema",
            )
        asked.append(("response_format.json_schema.schema", _json_schema(fmt.json_schema.json_schema)))
    if req.guided_json is not None:
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise APIError(f"guided_json is not valid JSON: {exc}", param="guided_json") from None
        asked.append(("guided_json", _json_schema(schema)))
    if req.guided_regex is not None:
        asked.append(("guided_regex", StructuredOutputParams(regex=req.guided_regex)))
    if req.guided_choice is not None:
        if not req.guided_choice or not all(req.guided_choice):
            raise APIError(
                "guided_choice must be a non-empty list of non-empty strings", param="guided_choice"
            )
        asked.append(("guided_choice", StructuredOutputParams(choice=list(req.guided_choice))))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", StructuredOutputParams(grammar=req.guided_grammar)))
    if len(asked) > 1:
        raise APIError(
            f"only one structured output option may be given, got {', '.join(name for name, _ in asked)}",
            param=asked[1][0].split(".")[0],
        )
    if not asked:
        return None
    param, spec = asked[0]
    checked(spec, param)
    return spec


def checked(spec: StructuredOutputParams, param: str) -> StructuredOutputParams:
    """``spec`` if its grammar compiles, else a 400 for ``param`` with llguidance's reason."""
    try:
        check_structured_output(spec)
    except ValueError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise APIError(f"{param}: invalid {spec.kind}: {reason}", param=param) from None
    return spec


def _json_schema(schema: Any) -> StructuredOutputParams:
    return StructuredOutputParams(json=json.dumps(schema))
