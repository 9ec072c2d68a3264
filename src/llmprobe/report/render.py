"""Template rendering. HTML templates autoescape every value; Markdown templates escape through
the ``md`` and ``code`` filters. The page's CSS and script are files in ``templates/`` inlined
into the page, so the HTML needs nothing but itself."""

from __future__ import annotations

import functools
from importlib import resources

import jinja2
from markupsafe import Markup

from .views import md_code, md_text, md_url

_PACKAGE = "llmprobe.report"


def _static(name: str) -> Markup:
    """A CSS/JS file's text, inlined verbatim (it is ours, not data)."""
    text = resources.files(_PACKAGE).joinpath("templates", name).read_text(encoding="utf-8")
    if "</" in text and ("</style" in text.lower() or "</script" in text.lower()):
        raise ValueError(f"{name} must not close its own element")
    return Markup(text)


@functools.lru_cache(maxsize=2)
def _environment(markdown: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(_PACKAGE, "templates"),
        autoescape=not markdown,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = md_text
    env.filters["code"] = md_code
    env.filters["url"] = md_url
    env.globals["static"] = _static
    return env


def render(template: str, **context) -> str:
    return _environment(template.endswith(".md.j2")).get_template(template).render(**context)
