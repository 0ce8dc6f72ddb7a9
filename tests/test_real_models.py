"""Both real models read as they are used: the grid's last layer says what `generate` says from
``tokenizer(prompt)`` with its defaults (Gemma adds BOS, SmolLM2 adds nothing), the adapter's proof, and
Gemma-3-270m's fact recall against a teacher-forced count written here."""

import pytest
import torch

from lenses import LogitLens, ModelAdapter
from lenses.analysis.facts import facts_view, read_facts
from lenses.pages.grid import lens_grid
from lenses.text import convention

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def add(a, b):\n    return",
           "The first president of the United States was"]


@pytest.fixture(params=["smollm2", "gemma"])
def real(request):
    model, tok = request.getfixturevalue(request.param)
    return request.param, model, tok, ModelAdapter.from_model(model)  # the adapter proves its decoding


@pytest.mark.ci
def test_each_models_own_convention(real):
    name, _, tok, _ = real
    expected = (tok.bos_token_id,) if name == "gemma" else ()  # Gemma adds <bos>; SmolLM2 adds nothing
    assert convention.of(tok).prefix == expected


@pytest.mark.ci
def test_grid_last_layer_is_generates_next_token(real):
    name, model, tok, adapter = real
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids  # the tokenizer's defaults
        with torch.no_grad():
            expected = int(model.generate(ids, max_new_tokens=1, do_sample=False)[0, -1])
        table = lens_grid(adapter, tok, prompt, {"logit": LogitLens(adapter)}, top_k=1)
        last = table[(table.layer == adapter.num_layers) & (table.position == table.position.max())]
        assert table[table.layer == 0].sort_values("position").input_id.tolist() == ids[0].tolist()
        assert int(last.id_1.iloc[0]) == expected, (name, prompt)


def _teacher_forced_recall(model, tok, fact, bos: bool) -> bool:
    prompt = tok(fact["prompt"].rstrip(), add_special_tokens=bos).input_ids
    answer = tok(" " + fact["answer"].strip(), add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
    return all(int(logits[len(prompt) - 1 + k].argmax()) == t for k, t in enumerate(answer))


def test_gemma_fact_recall_equals_a_teacher_forced_count(gemma, eager_kl):
    model, tok = gemma
    adapter = ModelAdapter.from_model(model, verify=False)
    facts = read_facts()[:40]
    result = facts_view(adapter, tok, {"logit": LogitLens(adapter)}, facts)
    pos = result.tables["positions"]
    final = pos[pos.layer == adapter.num_layers]
    ours = final.groupby("item").correct.all().sort_index().tolist()
    with_bos = [_teacher_forced_recall(model, tok, f, True) for f in facts]
    without = [_teacher_forced_recall(model, tok, f, False) for f in facts]
    assert ours == with_bos
    assert sum(with_bos) > sum(without)  # without its BOS Gemma is another model (0 of 100 shipped facts)


def test_gemma_shipped_lens_beats_the_logit_lens_at_every_layer(gemma):
    from lenses import TunedLens
    from lenses.kinds.registry import available, select_lenses
    from lenses.tracing.evaluate import cross_domain

    if "gemma-3-270m" not in available():
        pytest.skip("no tuned lens shipped for gemma-3-270m in this checkout")
    model, tok = gemma
    adapter = ModelAdapter.from_model(model, verify=False)
    lens = TunedLens.from_pretrained("gemma-3-270m", model=adapter)
    assert lens.config["input"]["prefix"] == [tok.bos_token_id]  # trained on blocks that start as Gemma reads text
    table = cross_domain(adapter, tok, {"logit": LogitLens(adapter), "tuned": lens}, ["wikipedia"], max_tokens=512)
    kl = table.pivot_table(index="layer", columns="lens", values="kl_nats")
    assert len(kl) == 18 and (kl.tuned < kl.logit).all()
    assert set(select_lenses("auto", adapter, tokenizer=tok)) >= {"logit", "tuned"}  # the default picks it up
