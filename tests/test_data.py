"""Reading corpora, packing tokens, and the errors for bad text input."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lenses import DataError
from lenses.text.data import make_blocks, pack, read_texts, tokenize


def test_reads_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_texts(tmp_path / "a.txt") == ["first document"]
    assert read_texts(tmp_path / "b.jsonl") == ["second", "third"]
    assert sorted(read_texts(tmp_path)) == ["first document", "second", "third"]


def test_non_utf8_names_file_and_fix(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8.*iconv"):
        read_texts(bad)


def test_empty_and_missing_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="contains no text"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_bad_jsonl_line_is_located(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2 has no string field 'text'"):
        read_texts(f)


def test_too_short_corpus(char_tokenizer):
    with pytest.raises(DataError, match="at least 2 are needed"):
        make_blocks(["tiny"], char_tokenizer, seq_len=64)


def test_default_corpus_is_real_prose():
    texts = read_texts(None)
    words = sum(len(t.split()) for t in texts)
    assert words > 200_000
    assert any("the" in t.split() for t in texts[:5])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=0, max_size=200), st.integers(1, 17))
def test_pack_keeps_order_and_drops_only_the_tail(stream, seq_len):
    blocks = pack(torch.tensor(stream, dtype=torch.long), seq_len)
    assert blocks.shape == (len(stream) // seq_len, seq_len)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8))
def test_tokenize_separates_documents_with_eos(docs):
    from conftest import CharTokenizer

    ids = tokenize(docs, CharTokenizer()).tolist()
    assert ids.count(0) == len(docs) and ids[-1] == 0
    assert len(ids) == sum(len(d.encode()) for d in docs) + len(docs)


def test_split_is_disjoint_and_independent_of_training_seed(char_tokenizer):
    docs = [f"document number {i} " * 5 for i in range(40)]
    train, held = make_blocks(docs, char_tokenizer, seq_len=16, eval_fraction=0.2)
    train2, held2 = make_blocks(docs, char_tokenizer, seq_len=16, eval_fraction=0.2)
    assert torch.equal(held, held2) and torch.equal(train, train2)
    assert len(held) == round(0.2 * (len(train) + len(held)))


def test_unwritable_output_is_reported_before_work(tmp_path):
    from lenses import LensesError
    from lenses.base.io import ensure_writable, write_json

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(LensesError, match="cannot write to .*--out"):
        ensure_writable(blocker / "out")
    with pytest.raises(LensesError, match="cannot write to"):
        write_json(blocker / "out" / "config.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing half-written


def test_atomic_writes_get_normal_permissions_and_leave_nothing_on_failure(tmp_path):
    import os
    import stat

    from lenses.base.io import atomic_write, write_text

    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "b.txt", lambda tmp: (open(tmp, "w").write("half"),
                                                      (_ for _ in ()).throw(RuntimeError())))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
