"""What Connexion rebuilds on every request, built once per operation instead.

Connexion 3 constructs, per request: the operation's decorator chain (with an
`inspect.signature` of the handler), the URI parser and parameter validator of the request
validation, the body validator, and a media-type table; its spec middleware runs a Starlette
router over every request to find the one path it serves. None of it depends on the request,
so each is built once here. Behaviour is Connexion's own: the same classes, called the same
way; only the construction moves out of the request.
"""

from __future__ import annotations

import functools
import typing as t
from collections.abc import Callable
from typing import Any, ClassVar

from connexion.apps.asynchronous import AsyncApi, AsyncOperation
from connexion.datastructures import MediaTypeDict
from connexion.decorators import StarletteDecorator
from connexion.decorators.parameter import AsyncParameterDecorator
from connexion.exceptions import UnsupportedMediaTypeProblem
from connexion.middleware import ConnexionMiddleware
from connexion.middleware.request_validation import (
    RequestValidationAPI,
    RequestValidationMiddleware,
    RequestValidationOperation,
)
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from connexion.security import AbstractSecurityHandler
from connexion.utils import is_nullable
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send


class PrebuiltParameterDecorator(AsyncParameterDecorator):
    """Connexion's, with the snake_case of each parameter name worked out once (three regular
    expressions per parameter per request otherwise)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sanitize: Callable[[str], str] = self.sanitize_fn  # type: ignore[has-type]
        self.sanitize_fn = functools.cache(sanitize)


class PrebuiltDecorator(StarletteDecorator):
    """The operation's decorator chain (parameter and response decorators) depends only on the
    handler (the request and operation come from context at call time): built once."""

    _chains: ClassVar[dict[Callable[..., Any], Callable[..., Any]]] = {}

    @property
    def _parameter_decorator_cls(self) -> type[AsyncParameterDecorator]:
        return PrebuiltParameterDecorator

    @functools.cached_property
    def uri_parser(self) -> Any:
        """Connexion builds it from the operation in context on every request; each decorator
        serves one operation (`PrebuiltOperation.fn`), so its first is its only one."""
        return super().uri_parser

    def decorate(self, function: Callable[..., Any]) -> Callable[..., Any]:
        chain = self._chains.get(function)
        if chain is None:
            chain = self._chains[function] = super().decorate(function)
        return chain


class PrebuiltOperation(AsyncOperation):
    @functools.cached_property
    def fn(self) -> Callable[..., Any]:
        decorator = PrebuiltDecorator(
            pythonic_params=self.pythonic_params, jsonifier=self.jsonifier
        )
        return decorator(self._fn)


class PrebuiltApi(AsyncApi):
    def make_operation(self, operation: Any) -> AsyncOperation:
        return PrebuiltOperation.from_operation(
            operation, pythonic_params=self.pythonic_params, jsonifier=self.jsonifier
        )


# Connexion's security check inspects our credential functions' signatures on every request; the
# answer depends only on the function and the keyword, so remember it.
AbstractSecurityHandler._accepts_kwarg = staticmethod(
    functools.cache(AbstractSecurityHandler._accepts_kwarg)
)

# Distinct (media type, charset) pairs whose body validator is kept per operation: the charset
# comes from the client, so the cache is bounded; past it, validators are built per request.
_BODY_VALIDATORS_KEPT = 8


class PrebuiltRequestValidationOperation(RequestValidationOperation):
    """Connexion's request validation, with the parameter validator (and its URI parser), the
    accepted media types and each body validator built once for the operation."""

    @functools.cached_property
    def _uri_parser(self) -> Any:
        """The operation's URI parser: the parameter and body validators each built their own."""
        operation = self._operation
        return operation.uri_parser_class(operation.parameters, operation.body_definition())

    @functools.cached_property
    def _parameter_validator(self) -> Any:
        return self._validator_map["parameter"](
            self._operation.parameters,
            uri_parser=self._uri_parser,
            strict_validation=self.strict_validation,
            security_query_params=self.security_query_params,
        )

    @functools.cached_property
    def _accepted(self) -> MediaTypeDict | None:
        consumes = self._operation.consumes
        return MediaTypeDict([(c.lower(), None) for c in consumes]) if consumes else None

    @functools.cached_property
    def _body_validators(self) -> dict[tuple[str, str], Any]:
        return {}

    def validate_mime_type(self, mime_type: str) -> None:
        if self._accepted is not None and mime_type.lower() not in self._accepted:
            raise UnsupportedMediaTypeProblem(
                detail=f"Invalid Content-type ({mime_type}), expected {self._operation.consumes}"
            )

    def _body_validator(self, mime_type: str, encoding: str) -> Any:
        key = (mime_type, encoding)
        if key in self._body_validators:
            return self._body_validators[key]
        validator = self._build_body_validator(mime_type, encoding)
        if len(self._body_validators) < _BODY_VALIDATORS_KEPT:
            self._body_validators[key] = validator
        return validator

    def _build_body_validator(self, mime_type: str, encoding: str) -> Any:
        operation = self._operation
        schema = operation.body_schema(mime_type)
        if not schema:
            return None
        body_validator = self._validator_map["body"].get(mime_type)
        if body_validator is None:
            return None  # Connexion skips validation for content types it has no validator for
        return body_validator(
            schema=schema,
            required=operation.request_body.get("required", False),
            nullable=is_nullable(operation.body_definition(mime_type)),
            encoding=encoding,
            strict_validation=self.strict_validation,
            uri_parser=self._uri_parser,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._parameter_validator.validate(scope)
        mime_type, encoding = self.extract_content_type(scope["headers"])
        self.validate_mime_type(mime_type)
        validator = self._body_validator(mime_type, encoding)
        if validator is not None:
            receive, scope = await validator.wrap_receive(receive, scope=scope)
        await self.next_app(scope, receive, send)


class PrebuiltRequestValidationAPI(RequestValidationAPI):
    def make_operation(self, operation: Any) -> RequestValidationOperation:
        return PrebuiltRequestValidationOperation(
            self.next_app,
            operation=operation,
            strict_validation=self.strict_validation,
            validator_map=self.validator_map,
        )


class PrebuiltRequestValidationMiddleware(RequestValidationMiddleware):
    api_cls = PrebuiltRequestValidationAPI


class SpecPathsMiddleware(SwaggerUIMiddleware):
    """Connexion's spec middleware (it serves /openapi.json), which ran a Starlette router over
    every request to find that path: requests for any path it does not serve go straight on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served: frozenset[str] = frozenset()
        self._served_prefixes: tuple[str, ...] = ()

    def add_api(self, *args: Any, **kwargs: Any) -> None:
        super().add_api(*args, **kwargs)
        exact, prefixes = set(), []
        for mount in self.router.routes:
            assert isinstance(mount, Mount)
            for route in mount.routes:
                path = mount.path + t.cast(Route, route).path
                if isinstance(route, Mount):  # the UI's static files: everything under it
                    prefixes.append(path.rstrip("/") + "/")
                elif "{" in path:  # a pattern: everything under its fixed start
                    prefixes.append(path.split("{", 1)[0])
                else:
                    exact.add(path)
        self._served = frozenset(exact)
        self._served_prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's scope path includes the root path (an app mounted under a prefix by its
        # proxy); the spec's routes are matched without it.
        path = scope.get("path", "")
        root_path = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if scope["type"] == "http" and not (
            path in self._served or path.startswith(self._served_prefixes)
        ):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


# Connexion's own middleware stack, in its order, with the classes above in place of the ones
# that rebuilt per request what they can build once. A tuple: Connexion inserts the middlewares
# an app adds into the list it is given, so each app gets its own copy.
MIDDLEWARES = tuple(
    {
        RequestValidationMiddleware: PrebuiltRequestValidationMiddleware,
        SwaggerUIMiddleware: SpecPathsMiddleware,
    }.get(middleware, middleware)
    for middleware in ConnexionMiddleware.default_middlewares
)
