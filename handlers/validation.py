"""Connexion's request validators, hardened and built once.

Hardened: Connexion turns only JSONDecodeError into a 400; invalid UTF-8, numbers longer than
Python's 4,300-digit limit and hostile nesting (RecursionError) escaped as 500s. (A charset that
is not UTF-8 is refused before, at the edge: handlers.middleware.JsonContentTypeMiddleware.)

Built once: Connexion compiles a jsonschema validator for the body, and deep-copies and compiles
one for every parameter, on every request. The schemas are the spec's own dicts, alive as long
as the app, so each compiled validator is kept by the identity of its schema.
"""

from __future__ import annotations

import json
import math
import typing as t

import jsonschema_rs
from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem
from connexion.json_schema import Draft4RequestValidator
from connexion.utils import is_null, is_nullable
from connexion.validators import VALIDATOR_MAP, JSONRequestBodyValidator, ParameterValidator
from jsonschema import Draft4Validator, ValidationError
from starlette.types import Scope

# (kind, id(schema)) -> (schema, its compiled validator); the schema is kept so its id stays
# its own.
_COMPILED: dict[tuple[str, int], tuple[t.Any, t.Any]] = {}


def _compiled(schema: t.Any, build: t.Callable[[], t.Any], kind: str = "jsonschema") -> t.Any:
    key = (kind, id(schema))
    hit = _COMPILED.get(key)
    if hit is None or hit[0] is not schema:
        hit = _COMPILED[key] = (schema, build())
    return hit[1]


class CompiledParameterValidator(ParameterValidator):
    """Connexion's parameter validation with each parameter's validator compiled once."""

    @staticmethod
    def validate_parameter(parameter_type, value, param, param_name=None):
        if is_nullable(param) and is_null(value):
            return None
        if value is not None:
            schema = param.get("schema", param)
            validator = _compiled(
                schema,
                lambda: Draft4Validator(schema, format_checker=Draft4Validator.FORMAT_CHECKER),
            )
            try:
                validator.validate(value)
            except ValidationError as exception:
                return str(exception)
            return None
        if param.get("required"):
            return f"Missing {parameter_type} parameter '{param['name']}'"
        return None


def _openapi_to_draft4(node: t.Any) -> t.Any:
    """A copy of an OpenAPI 3.0 schema in plain Draft 4: `nullable: true` becomes a "null" type."""
    if isinstance(node, list):
        return [_openapi_to_draft4(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _openapi_to_draft4(value) for key, value in node.items()}
    if copy.pop("nullable", False) is True and isinstance(copy.get("type"), str):
        copy["type"] = [copy["type"], "null"]
    return copy


def _fast_validator(schema: t.Any) -> t.Any:
    """The schema compiled by jsonschema-rs, or None if it cannot take it."""
    try:
        return jsonschema_rs.Draft4Validator(_openapi_to_draft4(schema), validate_formats=True)
    except Exception:
        return None


class StrictJSONRequestBodyValidator(JSONRequestBodyValidator):
    """Bodies are checked by jsonschema-rs first (a batch of 1,000 usage events took Connexion's
    Python validator some 60 ms); only a body it refuses goes through Connexion's validator,
    which stays the authority: it words the 400, and a body it accepts is accepted."""

    @property
    def _validator(self) -> t.Any:
        schema = self._schema
        return _compiled(
            schema,
            lambda: Draft4RequestValidator(schema, format_checker=Draft4Validator.FORMAT_CHECKER),
        )

    def _validate(self, body: t.Any) -> dict[t.Any, t.Any] | None:
        if body is not None:
            schema = self._schema
            fast = _compiled(schema, lambda: _fast_validator(schema), "jsonschema-rs")
            try:
                if fast is not None and fast.is_valid(body):
                    return None
            except Exception:  # a value jsonschema-rs cannot represent: let Connexion judge
                pass
        return super()._validate(body)

    async def _parse(self, stream: t.AsyncGenerator[bytes, None], scope: Scope) -> t.Any:
        """Connexion's parse, strict: JSON as RFC 8259 has it (no NaN, no Infinity, no number
        too large for a double), nested at most MAX_JSON_DEPTH deep. The handler parses the
        body again further down the stack, where a body nested just under the parser's own
        limit overflowed it (a 500)."""
        raw = b"".join([message async for message in stream])
        try:
            text = raw.decode(self._encoding)
            body = _STRICT_JSON.decode(text) if text else None
        except UnicodeDecodeError:
            raise BadRequestProblem(detail="the request body is not valid UTF-8") from None
        except RecursionError:
            raise BadRequestProblem(detail="the request body is nested too deeply") from None
        except ValueError as exc:
            raise BadRequestProblem(
                detail=f"the request body is not valid JSON: {exc}"[:300]
            ) from None
        if _nested_deeper_than(body, MAX_JSON_DEPTH):
            raise BadRequestProblem(detail="the request body is nested too deeply")
        return body


# No body this API takes nests deeper (a usage event's metadata is a small object).
MAX_JSON_DEPTH = 32


def _refuse_constant(name: str) -> t.NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a JSON number")
    return value


_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _nested_deeper_than(value: t.Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


VALIDATORS = {
    **VALIDATOR_MAP,
    "parameter": CompiledParameterValidator,
    "body": MediaTypeDict({**VALIDATOR_MAP["body"], "*/*json": StrictJSONRequestBodyValidator}),
}
