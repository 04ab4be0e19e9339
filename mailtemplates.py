"""Message templates (issue 12): stored through ``PUT /api/templates/<name>``, rendered once
when a message that names one is accepted, so the queued message is what gets sent.

Rendering uses Jinja2's sandbox (no attribute of Python's internals, no unsafe call),
with :class:`jinja2.StrictUndefined` (a variable the request does not give is a 400 naming
it) and autoescaping in the HTML part only. The output of a part is cut off (a 400) past
``max_chars``, so a template cannot make an unbounded body.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from errors import InvalidMessage
from messages import check_unicode, text_from_html
from store import StoredTemplate

PARTS = ("subject", "text", "html")
_PLAIN = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_ESCAPED = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True)


@functools.lru_cache(maxsize=256)
def _compiled(source: str, html: bool) -> Template:
    return (_ESCAPED if html else _PLAIN).from_string(source)


def check(template: StoredTemplate) -> None:
    """Refuse a template that does not compile, naming its part and line."""
    if template.text is None and template.html is None:
        raise InvalidMessage("a template needs text or html (or both)", "text")
    for part in PARTS:
        source = getattr(template, part)
        if source is None:
            continue
        check_unicode(source, part)
        if "\0" in source:
            raise InvalidMessage(f"{part} must not contain NUL", part)
        try:
            _compiled(source, part == "html")
        except TemplateSyntaxError as exc:
            raise InvalidMessage(
                f"{part}: template syntax error at line {exc.lineno}: {exc.message}", part
            ) from None


def render(
    template: StoredTemplate, variables: dict[str, Any], max_chars: int
) -> dict[str, str | None]:
    """The subject, text and html of ``template`` with ``variables``; raises
    :class:`InvalidMessage` (a 400) for a missing variable, a blocked operation or an
    error in the template."""
    out: dict[str, str | None] = {}
    for part in PARTS:
        source = getattr(template, part)
        if source is None:
            out[part] = None
            continue
        try:
            chunks = []
            size = 0
            for chunk in _compiled(source, part == "html").generate(variables):
                size += len(chunk)
                if size > max_chars:
                    raise InvalidMessage(
                        f"template {template.name}: the {part} is longer than {max_chars} "
                        "characters",
                        "template",
                    )
                chunks.append(chunk)
        except InvalidMessage:
            raise
        except UndefinedError as exc:
            raise InvalidMessage(
                f"variables: {exc.message} (template {template.name}, {part})", "variables"
            ) from None
        except SecurityError as exc:
            raise InvalidMessage(
                f"template {template.name}: {exc} (the sandbox does not allow it)", "template"
            ) from None
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise InvalidMessage(
                f"template {template.name}: {part} could not be rendered: "
                f"{type(exc).__name__}: {exc}",
                "template",
            ) from None
        out[part] = "".join(chunks)
    return out


async def apply(
    data: Any,
    fetch: Callable[[str], Any],
    max_chars: int,
) -> Any:
    """``data`` (a MessageRequest) with its template's subject, text and html rendered in
    (and the text made from a big HTML body, see :func:`with_text`). ``fetch`` (the
    store's get_template) may raise StoreUnavailable."""
    if data.template is None:
        if data.variables is not None:
            raise InvalidMessage("variables are for a template: name one", "variables")
        return await with_text(data, max_chars)
    given = [part for part in PARTS if getattr(data, part) is not None]
    if given:
        raise InvalidMessage(
            f"{given[0]}: give a template or {', '.join(PARTS)}, not both", given[0]
        )
    template = await fetch(data.template)
    if template is None:
        raise InvalidMessage(f"template: no template named {data.template!r}", "template")
    # Rendering is CPU work of unknown size: not on the event loop.
    parts = await asyncio.to_thread(render, template, data.variables or {}, max_chars)
    return await with_text(data.model_copy(update=parts), max_chars)


# HTML longer than this (characters) is turned into text in a worker thread.
LARGE_HTML_CHARS = 20_000


async def with_text(data: Any, max_chars: int) -> Any:
    """``data`` with the plain text made from its HTML when it has none (a big HTML body
    in a worker thread: html2text is pure Python); new_job makes a small one itself, and
    refuses HTML over ``max_chars``."""
    html = data.html
    if data.text is not None or not isinstance(html, str):
        return data
    if not LARGE_HTML_CHARS < len(html) <= max_chars:
        return data
    check_unicode(html, "html")
    return data.model_copy(update={"text": await asyncio.to_thread(text_from_html, html)})
