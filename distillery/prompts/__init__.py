"""Versioned Jinja2 prompt templates of the synthesis strategies: ``<strategy>/<name>.j2`` here.

A template's version is the sha256 of its source and of every template it extends or includes,
so an edit anywhere in what a prompt is made of is a new version. Rows and manifests name a
template as ``strategy/name@version``. They render in Jinja2's sandbox, like templates from recipes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

PROMPTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned Jinja2 prompt template: ``id`` is ``strategy/name@version``."""

    strategy: str
    name: str
    template: jinja2.Template
    version: str

    @property
    def id(self) -> str:
        return f"{self.strategy}/{self.name}@{self.version}"

    def render(self, **values: Any) -> str:
        return self.template.render(**values)


def _sources(env: jinja2.Environment, name: str, seen: set[str]) -> list[str]:
    """The template's source, then those of what it extends or includes (each once)."""
    if name in seen:
        return []
    seen.add(name)
    source, _, _ = env.loader.get_source(env, name)
    refs = sorted(r for r in jinja2.meta.find_referenced_templates(env.parse(source)) if r)
    return [source] + [s for ref in refs for s in _sources(env, ref, seen)]


@lru_cache(maxsize=64)
def load_template(strategy: str, name: str) -> PromptTemplate:
    """``distillery/prompts/<strategy>/<name>.j2``; an unknown name is an error that lists the known ones."""
    from schemas.templates import sandboxed_environment

    env = sandboxed_environment(loader=jinja2.FileSystemLoader(PROMPTS / strategy), keep_trailing_newline=True)  # shipped, but values are data: sandboxed too
    try:
        template = env.get_template(f"{name}.j2")
    except jinja2.TemplateNotFound as err:
        known = sorted(p.stem for p in (PROMPTS / strategy).glob("*.j2"))
        msg = f"no prompt template {strategy}/{name}.j2 (known: {', '.join(known) or 'none'})"
        raise ValueError(msg) from err
    digest = hashlib.sha256("\x00".join(_sources(env, f"{name}.j2", set())).encode()).hexdigest()
    return PromptTemplate(strategy, name, template, digest[:12])
