"""Connexion's JSON body validator, hardened: any body Python cannot parse is a 400.

Connexion turns only JSONDecodeError into a 400; invalid UTF-8, numbers longer than Python's
4,300-digit limit and hostile nesting (RecursionError) escaped as 500s.
"""

from __future__ import annotations

import typing as t

from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem
from connexion.validators import VALIDATOR_MAP, JSONRequestBodyValidator
from starlette.types import Scope


class StrictJSONRequestBodyValidator(JSONRequestBodyValidator):
    async def _parse(self, stream: t.AsyncGenerator[bytes, None], scope: Scope) -> t.Any:
        try:
            return await super()._parse(stream, scope)
        except UnicodeDecodeError:
            raise BadRequestProblem(detail="the request body is not valid UTF-8") from None
        except RecursionError:
            raise BadRequestProblem(detail="the request body is nested too deeply") from None
        except ValueError as exc:
            raise BadRequestProblem(
                detail=f"the request body is not valid JSON: {exc}"[:300]
            ) from None


VALIDATORS = {
    **VALIDATOR_MAP,
    "body": MediaTypeDict({**VALIDATOR_MAP["body"], "*/*json": StrictJSONRequestBodyValidator}),
}
