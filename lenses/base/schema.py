"""Declared fields of the files lenses reads: one schema per format, one checker for all of them.

A schema is a tuple of `Field`s; `check` validates a parsed record against it and raises one
`DataError` (or the ``error`` class given) that names the file and line, the field, what was found
and what a good record looks like. The readers of facts, patching tasks, JSONL corpora and lens
configs declare their formats here, so a new reader states its fields instead of re-writing checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lenses.base.errors import DataError


@dataclass(frozen=True)
class Field:
    """One field of a record: its name, the JSON type it must have, whether it may be left out, and
    for strings and lists whether it may be empty (``min_len``: the fewest list items)."""

    name: str
    kind: type | tuple[type, ...]
    required: bool = True
    nonempty: bool = False
    min_len: int = 0
    items: type | None = None  # the type of every item of a list field


def _type_name(kind, nonempty: bool = False) -> str:
    """``string``, ``non-empty string``, ``list``, ... (the word before "field" in our messages)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "non-empty string" if nonempty else "string", int: "whole-number", float: "number", list: "list",
             dict: "object", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check(record: Any, schema: tuple[Field, ...], where: str, example: str, error=DataError) -> dict:
    """``record`` if it is an object whose fields fit ``schema``; else one ``error`` naming the problem."""
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object like {example}, not {type(record).__name__}.")
    for f in schema:
        if f.name not in record:
            if f.required:
                raise error(f"{where} has no {_type_name(f.kind, f.nonempty)} field {f.name!r}; each record must "
                            f"look like {example}.")
            continue
        value = record[f.name]
        ok = isinstance(value, f.kind) and not (isinstance(value, bool) and bool not in (
            f.kind if isinstance(f.kind, tuple) else (f.kind,)))
        if not ok or (f.nonempty and isinstance(value, str) and not value.strip()):
            empty = " (empty)" if isinstance(value, str) else ""
            raise error(f"{where} has no {_type_name(f.kind, f.nonempty)} field {f.name!r}: it holds {value!r}{empty}; "
                        f"each record must look like {example}.")
        if isinstance(value, list):
            if len(value) < f.min_len:
                raise error(f"{where}: {f.name!r} has {len(value)} item(s), at least {f.min_len} are needed "
                            f"(a record looks like {example}).")
            if f.items is not None and not all(isinstance(v, f.items) and (not f.nonempty or v) for v in value):
                raise error(f"{where}: every item of {f.name!r} must be a {_type_name(f.items, f.nonempty)} "
                            f"(got {value!r}); a record looks like {example}.")
    return record


# --------------------------------------------------------------------------- the formats

FACT = (Field("prompt", str, nonempty=True), Field("answer", str, nonempty=True),
        Field("relation", str, required=False), Field("subject", str, required=False))
FACT_EXAMPLE = '{"prompt": "The capital of France is", "answer": "Paris"}'

TASK_ROW = (Field("prompt", str, nonempty=True), Field("labels", list, min_len=2, items=str, nonempty=True),
            Field("answer", str, required=False))
TASK_EXAMPLE = '{"prompt": "...", "labels": [" yes", " no"], "answer": " yes"}'

LENS_CONFIG = (Field("lens", str, required=False), Field("num_layers", int, required=False),
               Field("d_model", int, required=False), Field("fingerprint", dict, required=False),
               Field("training", dict, required=False), Field("num_hidden_layers", int, required=False))
LENS_CONFIG_EXAMPLE = '{"lens": "tuned", "num_layers": 30, "d_model": 576, "fingerprint": {...}}'


def corpus_line(field: str) -> tuple[Field, ...]:
    """The schema of one JSONL corpus line whose text is in ``field``."""
    return (Field(field, str),)
