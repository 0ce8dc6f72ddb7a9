"""Depth views on tiny models (invariants, bookkeeping) and their input readers and errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, tiny_adapter

from lenses import DataError, LogitLens, TunedLens
from lenses.analysis.facts import fact_items, facts_view, read_facts
from lenses.analysis.frequency import frequency_items, frequency_view, paragraph_items, word_starts
from lenses.analysis.mcq import option_ids
from lenses.text.frequency import BUCKET_NAMES, TokenFrequencies
from lenses.text.questions import read_mcq


@pytest.fixture
def tiny(char_tokenizer):
    adapter = tiny_adapter("llama")
    lens = TunedLens.for_model(adapter)
    with torch.no_grad():
        lens.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return adapter, char_tokenizer, {"logit": LogitLens(adapter), "tuned": lens}


def test_frequency_view_invariants(tiny):
    adapter, tok, lenses = tiny
    texts = [" ".join(f"word{i % 7} and the {i}" for i in range(j, j + 60)) for j in range(12)]
    result = frequency_view(adapter, tok, lenses, texts, num_positions=30, seq_len=64, prompts="blocks")
    layers, pos = result.tables["layers"], result.tables["positions"]
    L = adapter.num_layers
    assert pos.groupby(["lens", "layer"]).size().eq(30).all()
    assert np.allclose(layers.groupby(["lens", "layer"]).share.sum(), 1)
    assert np.allclose(layers.groupby(["lens", "layer"]).mean_mass.sum(), 1, atol=1e-5)
    assert (layers[layers.layer == L].flip_rate.fillna(0) == 0).all()
    # final shares equal the last layer's shares, and both lenses agree at the last layer
    last = layers[layers.layer == L]
    assert np.allclose(last.share, last.final_share)
    assert (pos[pos.layer == L].groupby(["item", "position"]).top1_id.nunique() == 1).all()
    # every traced position is followed by a word start (the paper's "cut at a word")
    assert all(tok.decode([int(t)]).startswith(" ") for t in pos.target_next)
    assert len(result.summary) == 2


def test_frequency_view_paragraph_prompts_follow_the_paper(tiny):
    """One held-out paragraph of more than 200 characters per prompt, cut before a word; ranks counted
    on the whole corpus."""
    from lenses.text.data import split_documents

    adapter, tok, lenses = tiny
    texts = ["\n\n".join(f"Doc {j} part {k}: " + " ".join(f"word{(i * k) % 11} the" for i in range(30 + k))
                          for k in range(1, 6)) + "\n\nshort paragraph." for j in range(40)]
    result = frequency_view(adapter, tok, lenses, texts, num_positions=12, seed=3)
    pos = result.tables["positions"]
    assert pos.groupby(["lens", "layer"]).size().eq(12).all()
    assert (pos.groupby(["lens", "item"]).position.nunique() == 1).all()  # one cut per prompt
    assert all(tok.decode([int(t)]).startswith(" ") for t in pos.target_next)
    docs, _, cut = split_documents(texts, tok)
    held = [p for d in docs[cut:] for p in d.split("\n\n") if len(p) > 200]
    train = {p for d in docs[:cut] for p in d.split("\n\n")}
    assert len(held) >= 12 and not set(held) & train
    items = paragraph_items(tok, docs[cut:], word_starts(tok, VOCAB), 12, seed=3)
    for item in items:  # each prompt is the start of one held-out paragraph, ending before a word
        text = tok.decode(item.ids)
        assert item.positions == [len(item.ids) - 1] and any(p.startswith(text) for p in held)
        assert text.split()[0] == "Doc"


def test_frequency_items_sample_word_boundaries():
    starts = torch.zeros(10, dtype=torch.bool)
    starts[[3, 4]] = True
    blocks = torch.tensor([[1, 3, 2, 2, 4, 2, 3, 0, 3, 2], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]])
    items = frequency_items(blocks, starts, num_positions=10, min_context=2, eos=0)
    assert len(items) == 1  # the second block has no word starts
    assert items[0].positions == [3, 5]  # position 6 is followed by EOS... and 7 is EOS itself
    assert items[0].targets["next"] == [4, 3]


def test_word_starts(char_tokenizer):
    starts = word_starts(char_tokenizer, VOCAB)
    space, newline = char_tokenizer(" ").input_ids[0], 0  # id 0 decodes to a newline (EOS here)
    assert starts[space] and starts[newline]
    assert starts.sum() == 2  # every other character token is not a boundary


def _greedy(adapter, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(adapter.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_facts_view_on_multi_token_answers(tiny):
    adapter, tok, lenses = tiny
    facts = [{"prompt": "The capital of France is", "answer": "Paris"}]
    for prompt in ("Two plus two is", "The sky is", "Water boils at", "My name is", "It was"):
        cont = tok.decode(_greedy(adapter, tok(prompt + " ").input_ids, 4))
        if cont == cont.strip() and cont.isprintable():
            facts.append({"prompt": prompt, "answer": cont})  # tokens 2..5 are the model's own greedy choices
    assert len(facts) >= 2
    items, tokens = fact_items(tok, facts)
    assert [len(it.positions) for it in items][0] == 6  # " Paris": one token per character
    assert items[0].ids[items[0].positions[0] + 1] == tok(" ").input_ids[0]
    result = facts_view(adapter, tok, lenses, facts)
    pos = result.tables["positions"]
    assert set(pos.answer_token) == set(range(1, 7))
    summary = result.tables["tokens"]
    assert (summary.final_rank == 1).all()  # only positions the model gets right are scored
    greedy = summary[(summary.item >= 1) & (summary.answer_token >= 2)]
    assert len(greedy) == 2 * 4 * (len(facts) - 1)  # both lenses, every greedy token kept
    assert (greedy.first_correct <= greedy.settled).all() and (greedy.settled <= adapter.num_layers).all()
    final = pos[pos.layer == adapter.num_layers]
    assert set(map(tuple, summary[["lens", "item", "position"]].to_numpy())) == set(
        map(tuple, final[final.rank_answer == 1][["lens", "item", "position"]].to_numpy()))


def test_fact_readers_accept_three_layouts(tmp_path):
    path = tmp_path / "f.jsonl"
    lines = [
        {"prompt": "The capital of Peru is", "answer": "Lima"},
        {"requested_rewrite": {"prompt": "{} is located in", "subject": "Kenya", "target_true": {"str": "Africa"},
                               "relation_id": "P30"}},
        {"single_hops": [{"cloze": "Paris is the capital of", "answer": "France"}, {"cloze": "France is in",
                                                                                    "answer": "Europe"}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    facts = read_facts(path)
    assert [(f["prompt"], f["answer"]) for f in facts] == [
        ("The capital of Peru is", "Lima"), ("Kenya is located in", "Africa"),
        ("Paris is the capital of", "France"), ("France is in", "Europe")]


def test_shipped_data_is_large_enough_and_valid():
    facts = read_facts()
    assert len(facts) >= 200 and len({f["prompt"] for f in facts}) >= 200
    questions = read_mcq()
    assert len(questions) >= 104  # 100 scored + 4 examples
    for q in questions:
        assert len(set(q["options"])) == 4 and q["answer"] in "ABCD"


@pytest.mark.parametrize("reader,content,message", [
    (read_facts, '{"prompt": "x", "answer": ""}\n', "empty prompt or answer"),
    (read_facts, '{"prompt": "x"\n', "not valid JSON"),
    (read_facts, '{"question": "x"}\n', "unknown fact layout"),
    (read_facts, "", "holds no facts"),
    (read_mcq, "Q?,a,b,,d,A\n", "empty option"),
    (read_mcq, "Q?,a,b,c,A\n", "5 fields"),
    (read_mcq, "Q?,a,b,c,d,E\n", "not one of the options"),
    (read_mcq, "", "holds no questions"),
])
def test_bad_fact_and_mcq_files(tmp_path, reader, content, message):
    path = tmp_path / "data"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        reader(path)


def test_answer_that_does_not_tokenise_is_named(char_tokenizer):
    with pytest.raises(DataError, match="does not survive tokenisation"):
        fact_items(char_tokenizer, [{"prompt": "The capital of Moldova is", "answer": "Chișinău"}])


def test_mcq_header_is_optional(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,A,B,C,D,answer\n"Which, exactly?",1,2,3,4,c\n', encoding="utf-8")
    assert read_mcq(path) == [{"question": "Which, exactly?", "options": ["1", "2", "3", "4"], "answer": "C"}]


def test_option_letters_must_be_single_tokens(char_tokenizer):
    with pytest.raises(DataError, match="one token"):
        option_ids(char_tokenizer)


TEXT = st.characters(blacklist_categories=("Cs", "Cc"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(TEXT, min_size=1, max_size=30).filter(lambda s: s.strip()),
                          st.lists(st.text(TEXT, max_size=12), min_size=4, max_size=4),
                          st.sampled_from("ABCDabcd")), min_size=1, max_size=6))
def test_mcq_csv_round_trip(tmp_path_factory, rows):
    import csv

    rows = [(q, opts, a) for q, opts, a in rows if all(o.strip() for o in opts)]
    path = tmp_path_factory.mktemp("q") / "q.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([[q, *opts, a] for q, opts, a in rows])
    if not rows:
        with pytest.raises(DataError):
            read_mcq(path)
        return
    got = read_mcq(path)
    assert [(g["question"], g["options"], g["answer"]) for g in got] == [
        (q.strip(), [o.strip() for o in opts], a.upper()) for q, opts, a in rows]


def test_bucket_names_cover_all_ranks():
    freqs = TokenFrequencies(torch.arange(2000, 0, -1))
    b = freqs.bucket(torch.tensor([0, 9, 10, 99, 100, 999, 1000, 1999]))
    assert [BUCKET_NAMES[i] for i in b] == ["1-10", "1-10", "11-100", "11-100", "101-1000", "101-1000", "1001+",
                                            "1001+"]


@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_batched_views_write_the_same_tables(tmp_path):
    """`--batch-size 4` against one text at a time, end to end through `lenses analyze` on the four
    depth views: every CSV has the same rows, the same top-1 ids and ranks, numbers within 1e-5."""
    from tiny_models import tiny_inputs

    from lenses.commands import analyze

    root = tiny_inputs(tmp_path / "in", letters=True)
    common = ["--model", str(root / "model"), "--lens", "logit", "--corpus", str(root / "corpus.txt"), "--facts",
              str(root / "facts.jsonl"), "--mcq", str(root / "mcq.csv"), "--view", "all",
              "--num-positions", "40", "--no-progress"]
    assert analyze.main([*common, "--batch-size", "1", "--out", str(tmp_path / "one")]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tracing one text at a time")  # batching must not be refused
        assert analyze.main([*common, "--batch-size", "4", "--out", str(tmp_path / "four")]) == 0
    files = sorted(p.name for p in (tmp_path / "one").glob("*.csv"))
    assert len(files) >= 6 and files == sorted(p.name for p in (tmp_path / "four").glob("*.csv"))
    for name in files:
        a, b = pd.read_csv(tmp_path / "one" / name), pd.read_csv(tmp_path / "four" / name)
        assert a.shape == b.shape and list(a.columns) == list(b.columns), name
        for col in a.columns:
            if pd.api.types.is_float_dtype(a[col]):
                np.testing.assert_allclose(b[col], a[col], atol=1e-5, rtol=0, err_msg=f"{name}:{col}")
            else:
                assert (a[col].astype(str) == b[col].astype(str)).all(), f"{name}:{col}"


def test_batched_agreement_equals_one_block_at_a_time(char_tokenizer):
    """The agreement view runs its equal-length blocks several per forward pass: the same table."""
    from tiny_models import TEXT, random_lens, tiny_adapter

    from lenses.analysis.agreement import agreement_view

    adapter = tiny_adapter("llama")
    lenses = {"logit": LogitLens(adapter), "tuned": random_lens(adapter, scale=0.1)}
    one = agreement_view(adapter, char_tokenizer, lenses, [TEXT], num_positions=70, seq_len=16, batch_size=1)
    three = agreement_view(adapter, char_tokenizer, lenses, [TEXT], num_positions=70, seq_len=16, batch_size=3)
    a, b = one.tables["layers"], three.tables["layers"]
    assert (a.n == 70).all() and (b.n == 70).all()
    np.testing.assert_allclose(b.top1_agreement, a.top1_agreement, atol=1e-9)
    np.testing.assert_allclose(b.sym_kl, a.sym_kl, rtol=1e-5, atol=1e-7)
