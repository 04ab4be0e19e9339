"""Every answer each operation can give, for the OpenAPI description (``/openapi.json``).

quart-schema describes the bodies from the models in schemas.py (``document_response``);
:func:`answers` adds, per route, each status it can answer with what it means there, and
:class:`Provider` writes them into the description: JSON errors as the ``Error`` model,
plain-text answers (the legacy ``GET /``, ``/healthz``, ``/readyz``) as ``text/plain``, and
the headers that come with them (``Retry-After``, ``WWW-Authenticate``, ``Location``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from quart_schema import OpenAPIProvider, document_response
from werkzeug.routing import Rule

from schemas import Error

T = TypeVar("T", bound=Callable[..., Any])
Media = Literal["json", "text"]

_ATTRIBUTE = "_mailroom_answers"

# What a status means on any route that gives it; a route may say more (see answers()).
MEANINGS: dict[int, str] = {
    400: "Invalid request: the reason is in the answer (and the offending field, if one). "
    "Any route answers 400 to a query string that is not valid UTF-8 or a request with "
    "both Content-Length and Transfer-Encoding.",
    401: "No valid token: send 'Authorization: Bearer <API_TOKEN>' (direct loopback "
    "clients need none unless ALLOW_LOOPBACK=false).",
    404: "No such message (an unknown or malformed id).",
    409: "A request with the same Idempotency-Key is still in progress.",
    413: "The body is larger than MAX_REQUEST_BYTES.",
    415: "The body is not sent with Content-Type: application/json.",
    422: "The Idempotency-Key was used before with a different body.",
    429: "A rate limit was hit (named in the answer); Retry-After says when to try again.",
    503: "RabbitMQ or the message database is unavailable, or RabbitMQ did not confirm within "
    "PUBLISH_TIMEOUT: nothing was queued (unless the answer names the message id); try "
    "again after Retry-After.",
}

# Headers that come with a status, wherever it is given.
HEADERS: dict[int, dict[str, str]] = {
    202: {"Location": "/api/messages/<id>: where the message's record is."},
    401: {"WWW-Authenticate": "Bearer"},
    429: {"Retry-After": "Seconds until the limit has room again."},
    503: {"Retry-After": "Seconds to wait before trying again."},
}


def answers(*codes: int | tuple[int, str], media: Media = "json") -> Callable[[T], T]:
    """Document that a route answers each of ``codes``: a status (its usual meaning from
    :data:`MEANINGS`), or ``(status, what it means here)``. ``media`` says how the body
    comes: JSON (errors as :class:`schemas.Error`) or plain text."""

    def decorator(func: T) -> T:
        documented: dict[int, tuple[str, Media]] = dict(getattr(func, _ATTRIBUTE, {}))
        for item in codes:
            code, meaning = item if isinstance(item, tuple) else (item, MEANINGS[item])
            documented[code] = (meaning, media)
            if code >= 400 and media == "json":
                func = document_response(Error, code)(func)
        setattr(func, _ATTRIBUTE, documented)
        return func

    return decorator


def documented_answers(func: Callable[..., Any]) -> dict[int, tuple[str, Media]]:
    """What :func:`answers` recorded on ``func``."""
    found: dict[int, tuple[str, Media]] = getattr(func, _ATTRIBUTE, {})
    return found


class Provider(OpenAPIProvider):
    """quart-schema's description, with what :func:`answers` recorded on each route."""

    def generate_rules(self) -> Iterable[Rule]:
        # The web page's own files (/ui/<file>) are not part of the API.
        return (r for r in super().generate_rules() if not r.endpoint.endswith("static"))

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        documented = documented_answers(self._app.view_functions[rule.endpoint])
        for operations in paths.values():
            for operation in operations.values():
                responses = dict(operation["responses"])
                for code, (meaning, media) in sorted(documented.items()):
                    response = dict(responses.get(code, {}))
                    response["description"] = meaning
                    if media == "text":
                        response["content"] = {"text/plain": {"schema": {"type": "string"}}}
                    if code in HEADERS:
                        response["headers"] = {
                            name: {"description": about, "schema": {"type": "string"}}
                            for name, about in HEADERS[code].items()
                        }
                    responses[code] = response
                operation["responses"] = dict(sorted(responses.items()))
        return paths, components
