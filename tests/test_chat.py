"""Chat templates and generated tokens: each token's role in a templated turn (hand-computed on a tiny
template), greedy generation against `model.generate`, seeded sampling, the views scoring from the
assistant's first token, and one-line refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer, run_analyze, save_tiny_model, tiny_model

from lenses import LogitLens, ModelAdapter
from lenses.analysis.facts import facts_view
from lenses.analysis.mcq import mcq_view
from lenses.base.errors import LensesError
from lenses.pages.grid import lens_grid
from lenses.text.chat import chat_turn, generate, use_template

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def _tok(letters: bool = False):
    tok = byte_tokenizer(letters)
    tok.chat_template = TEMPLATE
    return tok


def test_roles_of_a_templated_turn_are_the_hand_computed_ones():
    tok = _tok()
    turn = chat_turn(tok, "hi", answer_ids=[65, 66])  # "[user]hi\n[assistant]" then "AB": one byte per token
    assert turn.roles == ["template"] * 6 + ["user"] * 2 + ["template"] * 12 + ["assistant"] * 2
    assert turn.answer_start == 20 and tok.decode(turn.ids[:20]) == "[user]hi\n[assistant]"
    sys_turn = chat_turn(tok, "hi", system="be")  # "[system]be\n[user]hi\n[assistant]"
    assert sys_turn.roles == ["template"] * 8 + ["system"] * 2 + ["template"] * 7 + ["user"] * 2 + ["template"] * 12


def test_use_template_auto_on_off_and_refusals():
    tok, plain = _tok(), byte_tokenizer()
    assert use_template("auto", tok, "my-model-Instruct")[0] is True
    assert use_template("auto", tok, "my-base-model")[0] is False
    assert use_template("auto", plain, "x-instruct")[0] is False
    assert use_template("off", tok, "x-instruct")[0] is False
    with pytest.raises(LensesError, match="no chat template"):
        use_template("on", plain, "x")
    with pytest.raises(LensesError, match="--system needs the chat template"):
        use_template("off", tok, "x-instruct", system="be brief")


def test_greedy_generation_equals_model_generate_and_the_last_layer_says_the_same():
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=257)
    adapter = ModelAdapter.from_model(model)
    prompt = [72, 101, 108, 108, 111]
    new = generate(model, prompt, 12)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert new == ref
    ids = prompt + new
    table = lens_grid(adapter, byte_tokenizer(), "", {"logit": LogitLens(adapter)}, top_k=1, ids=ids,
                      roles=["text"] * 5 + ["generated"] * 12)
    last = table[table.layer == adapter.num_layers].sort_values("position")
    assert last.id_1.tolist()[4:-1] == new  # the traced model output at each position is the next generated token
    assert last.generated.tolist() == [False] * 5 + [True] * 12
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    assert last.id_1.tolist() == logits.argmax(-1).tolist()


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_model("llama", vocab_size=257)
    a, b = generate(model, [1, 2, 3], 15, sample=True, seed=7), generate(model, [1, 2, 3], 15, sample=True, seed=7)
    assert a == b and generate(model, [1, 2, 3], 15, sample=True, seed=8) != a
    with pytest.raises(LensesError, match=r"must be 1\.\."):
        generate(model, [1], 0)


def test_facts_and_mcq_score_from_the_assistant_turn():
    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=261))
    tok = _tok(letters=True)
    lens = {"logit": LogitLens(adapter)}
    res = facts_view(adapter, tok, lens, [{"prompt": "The sky is", "answer": "blue"}], chat=True)
    pos = res.tables["positions"]
    # "[user]Complete this sentence: The sky is\n[assistant]" then the assistant says "The sky is blue"
    start = len("[user]Complete this sentence: The sky is\n[assistant]") + len("The sky is")
    assert sorted(pos.position.unique()) == [start - 1 + k for k in range(5)]  # " blue": 5 byte tokens
    assert sorted(pos.target_answer.unique()) == sorted(set(tok(" blue").input_ids))
    questions = [{"question": f"Q{i}?", "options": ["w", "x", "y", "z"], "answer": "ABCD"[i % 4]} for i in range(6)]
    res = mcq_view(adapter, tok, lens, questions, num_questions=2, shots=4, chat=True)
    p = res.tables["positions"]
    assert set(p.target_A) == {ord("A")}  # the letter alone, as the assistant's first token
    assert any("most common choice" in line for line in res.summary)


@pytest.mark.parametrize("args,words", [
    (["--chat-template", "on"], "no chat template"),
    (["--system", "be brief", "--chat-template", "off"], "--system needs the chat template"),
    (["--generate", "0"], "--generate"),
    (["--sample"], "--sample draws"),
    (["--view", "frequency", "--system", "be brief"], "apply to the facts, mcq, fidelity, intermediates and"),
])
def test_bad_chat_input_is_one_line_and_exit_2(tmp_path, args, words, capsys):
    """In-process through the command's own entry point (`run_cli`, as ``analyze.py`` runs it)."""
    model = save_tiny_model(tmp_path / "model")
    proc = run_analyze(["--model", str(model), "--lens", "logit", "--prompt", "Hello", "--out", str(tmp_path / "out"),
                     "--no-progress", *args], capsys)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert words in proc.stderr and "Traceback" not in proc.stderr



def test_grid_with_a_template_and_generated_tokens_from_the_command_line(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    out = tmp_path / "out"
    proc = run_analyze(["--model", str(model), "--lens", "logit", "--prompt", "Hello", "--chat-template", "on",
                     "--generate", "6", "--out", str(out), "--html", str(out / "grid.html"), "--png",
                     str(out / "grid.png"), "--no-progress"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generated 6 token(s) (greedy)" in proc.stdout and "chat template on" in proc.stdout
    from lenses.pages.grid import read_grid

    table = read_grid(out / "lens_grid.csv")
    first = table[(table.lens == "logit") & (table.layer == 0)].sort_values("position")
    assert first.role.tolist() == ["template"] * 6 + ["user"] * 5 + ["template"] * 12 + ["generated"] * 6
    assert first.generated.tolist() == [False] * 23 + [True] * 6
    assert "role-generated" in (out / "grid.html").read_text(encoding="utf-8")


def test_kv_cache_generation_equals_full_passes_and_sampling_draws_the_same():
    """`generate` continues from the KV cache; a model without a cache (forced here) recomputes: the same."""
    model = tiny_model("llama", vocab_size=257)
    fast = generate(model, [3, 4, 5], 10)
    real_forward = model.forward

    def no_cache(*args, **kwargs):
        kwargs.pop("past_key_values", None)
        out = real_forward(*args, **{**kwargs, "use_cache": False})
        out.past_key_values = None
        return out

    model.forward = no_cache
    try:
        assert generate(model, [3, 4, 5], 10) == fast
    finally:
        model.forward = real_forward


def test_batched_greedy_answers_equal_one_at_a_time():
    """Prompts of different lengths answered together (left-padded) give each prompt's own greedy answer, and
    an answer that reaches the end token stops there."""
    from lenses.text.chat import generate_batch

    model = tiny_model("llama", vocab_size=257)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    alone = [generate(model, p, 9) for p in prompts]
    assert generate_batch(model, prompts, 9, pad=0) == alone
    eos = alone[1][3]
    ended = generate_batch(model, prompts, 9, eos=eos, pad=0)
    assert ended == [generate(model, p, 9, eos=eos) for p in prompts] and ended[1][-1] == eos and len(ended[1]) <= 4


def test_a_generated_corpus_is_deterministic_cached_and_resumed(tmp_path, monkeypatch):
    from lenses.text.chat import generated_corpus

    monkeypatch.setenv("LENSES_CACHE", str(tmp_path / "cache"))
    adapter = ModelAdapter.from_model(tiny_model("llama", vocab_size=257))
    tok = _tok()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Document number {i} says something about topic {i}."})
                                for i in range(8)))
    texts = generated_corpus(adapter, tok, f"generated:3:{corpus}", seed=1)
    assert len(texts) == 3 and all(t.startswith("[user]Document number") and "[assistant]" in t for t in texts)
    cached = list((tmp_path / "cache" / "generated").glob("*.jsonl"))
    assert len(cached) == 1
    lines = cached[0].read_text().splitlines()
    cached[0].write_text("\n".join(lines[:1]) + '\n{"text": "cut sho')  # an interrupted run: one and a half lines
    assert generated_corpus(adapter, tok, f"generated:3:{corpus}", seed=1) == texts  # resumed, the same
    assert generated_corpus(adapter, tok, f"generated:4:{corpus}", seed=1)[:3] == texts  # extended
    other = generated_corpus(adapter, tok, f"generated:3:{corpus}", seed=2)
    assert other != texts  # another seed draws other prompts
    with pytest.raises(LensesError, match="generated:N"):
        generated_corpus(adapter, tok, "generated:zero")
    with pytest.raises(LensesError, match="no chat template"):
        generated_corpus(adapter, byte_tokenizer(), f"generated:2:{corpus}")


def test_views_read_generated_transcripts_and_never_a_lens_s_own_training_ones(tmp_path, monkeypatch):
    """``--corpus generated:N`` in the views: the same transcripts training makes; with a lens trained on
    ``generated:4`` the views read every transcript outside that lens's training part (held-out ones of the
    first 4, and all later ones), whatever N they ask for."""
    from lenses import TunedLens
    from lenses.analysis import AnalysisConfig, Context, run_view
    from lenses.text.chat import generated_corpus
    from lenses.text.data import split_documents

    monkeypatch.setenv("LENSES_CACHE", str(tmp_path / "cache"))
    adapter, tok = ModelAdapter.from_model(tiny_model("llama", vocab_size=257)), _tok()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Document {i} is about topic {i} and more words here."})
                                for i in range(12)))
    lens = TunedLens.for_model(adapter.model, training={"corpus": f"generated:8:{corpus}"})
    ctx = Context(adapter, tok, {"tuned": lens}, AnalysisConfig(corpus=f"generated:10:{corpus}", num_positions=40,
                                                                 progress=False))
    every = generated_corpus(adapter, tok, f"generated:10:{corpus}")
    assert ctx.texts == every
    docs, _, cut = split_documents(every[:8], tok)
    held, source = ctx.view_texts
    assert set(held) == set(docs[cut:]) | set(every[8:]) and not set(held) & set(docs[:cut])
    assert f"the {len(held)} of 10 transcripts" in source and "tuned lens was trained on the others" in source
    fresh = Context(adapter, tok, {"tuned": TunedLens(adapter.num_layers, adapter.d_model)},
                    AnalysisConfig(corpus=f"generated:10:{corpus}", num_positions=40, progress=False))
    assert fresh.view_texts[0] == every  # no lens trained on them: all of them
    result = run_view("early-exit", ctx)
    assert any(f"the {len(held)} of 10 transcripts of generated:10" in line for line in result.lines())


def test_the_jacobian_fit_reads_a_generated_corpus_as_training_does(tmp_path, monkeypatch):
    """``--corpus generated:N`` in the J-lens fit: the prompts are the transcripts training would read (the same
    cache), not a file named 'generated:N' (which was refused before)."""
    from lenses.jobs.jlens_estimator import corpus_prompts, fit_prompts
    from lenses.jobs.jlens_fit import FitConfig, fit
    from lenses.text.chat import generated_corpus

    monkeypatch.setenv("LENSES_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama", vocab_size=257), _tok()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Document number {i} says something about topic {i}, at length."})
                                for i in range(12)))
    spec = f"generated:12:{corpus}"
    cfg = FitConfig(corpus=spec, out=str(tmp_path / "jl"), num_prompts=3, seq_len=40, min_chars=20, skip_first=2,
                    eval_tokens=64, progress=False)
    result = fit(cfg, model=model, tokenizer=tok)
    texts = generated_corpus(ModelAdapter.from_model(model), tok, spec)
    expected = corpus_prompts(texts, tok, 3, 40, 20)
    assert result.lens.n_prompts == len(expected) == 3
    direct = fit_prompts(ModelAdapter.from_model(model), expected, skip_first=2)  # the same prompts, fitted here
    for k in direct.layers:
        assert torch.allclose(result.lens.matrices[k].float(), direct.matrices[k].float(), atol=1e-3)
