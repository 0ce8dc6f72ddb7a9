"""Every path reads a model as it is used: what ``tokenizer(text)`` gives with its defaults (BOS where the
tokenizer adds one), on tokenizers that do and do not add one (`lenses.text.convention`)."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer
from tiny_models import TEXT, tiny_adapter

from lenses import LensMismatchError, LogitLens, TunedLens
from lenses.analysis.calibration import calibration_view
from lenses.analysis.common import text_blocks
from lenses.analysis.facts import fact_items
from lenses.analysis.frequency import paragraph_items, word_starts
from lenses.analysis.mcq import option_ids
from lenses.jobs.jlens_estimator import corpus_prompts
from lenses.kinds.registry import select_lenses
from lenses.pages.grid import lens_grid
from lenses.text import convention
from lenses.text.data import make_blocks, pack
from lenses.tracing.evaluate import evaluate

BOS = 96  # a token of its own, outside the characters' ids 1..95 and EOS 0


class BosCharTokenizer(CharTokenizer):
    """The character tokenizer with a BOS that ``tokenizer(text)`` adds by default (as Gemma's, Llama-3's)."""

    bos_token_id = BOS

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        if isinstance(text, list):  # a batch, as a transformers tokenizer takes it
            out = CharTokenizer.__call__(self, "")
            out.input_ids = [self(t, add_special_tokens).input_ids for t in text]
            return out
        out = CharTokenizer.__call__(self, text)
        if add_special_tokens:
            out.input_ids = [BOS] + out.input_ids
        if return_tensors == "pt":
            out.input_ids = torch.tensor([out.input_ids])
        return out

    def decode(self, ids):
        return "".join("<bos>" if i == BOS else super(BosCharTokenizer, self).decode([i]) for i in ids)


@pytest.fixture(params=["no-bos", "bos"])
def setting(request):
    """A tiny Llama (97 tokens: the characters, EOS 0, BOS 96) and a tokenizer that adds BOS or not."""
    tok = BosCharTokenizer() if request.param == "bos" else CharTokenizer()
    return tiny_adapter("llama", vocab_size=97), tok


def _default_ids(tok, text):
    out = tok(text)  # what a user, generate() and every harness feed: the tokenizer's defaults
    return list(out.input_ids)


def test_convention_is_what_the_tokenizer_adds():
    assert convention.of(CharTokenizer()).prefix == ()
    assert convention.of(BosCharTokenizer()).prefix == (BOS,)
    for tok in (CharTokenizer(), BosCharTokenizer()):
        assert convention.encode(tok, "Hello there") == _default_ids(tok, "Hello there")


def test_packed_blocks_start_as_the_model_expects():
    stream = torch.arange(1, 41)
    blocks = pack(stream, 8, (BOS,))
    assert blocks.shape == (5, 8)
    assert (blocks[:, 0] == BOS).all()
    assert blocks[:, 1:].reshape(-1).tolist() == list(range(1, 36))  # the text stays in order, nothing skipped
    assert pack(stream, 8).reshape(-1).tolist() == list(range(1, 41))


def test_training_and_view_blocks_follow_the_tokenizer(setting):
    _, tok = setting
    first = convention.of(tok).first
    train, held = make_blocks([TEXT] * 6, tok, 32, max_eval_blocks=4)
    for blocks in (train, held):
        assert blocks[:, :first].eq(BOS).all() and not blocks[:, first:].eq(BOS).any()
    chosen, blocks, available, f = text_blocks([TEXT], tok, 32, 50, 0, "test")
    assert f == first and available == len(blocks) * (31 - first)
    assert blocks[:, :first].eq(BOS).all()


def test_prompts_of_every_view_equal_the_tokenizers_defaults(setting):
    adapter, tok = setting
    facts = [{"prompt": "The capital of France is", "answer": "Paris"}]
    items, _ = fact_items(tok, facts)
    answer = tok(" Paris", add_special_tokens=False).input_ids
    assert items[0].ids == _default_ids(tok, "The capital of France is") + answer  # answer plain: a continuation
    assert option_ids(tok, "") == [tok(x, add_special_tokens=False).input_ids[0] for x in "ABCD"]  # no BOS
    starts = word_starts(tok, adapter.vocab_size)
    paragraphs = paragraph_items(tok, [TEXT], starts, 5)
    full = _default_ids(tok, TEXT.split("\n\n")[0].strip())
    for it in paragraphs:
        assert it.ids == full[: len(it.ids)] and it.positions[0] >= convention.of(tok).first


def test_the_grid_reads_the_prompt_as_generate_does(setting):
    adapter, tok = setting
    prompt = "The cat sat"
    table = lens_grid(adapter, tok, prompt, {"logit": LogitLens(adapter)}, top_k=1)
    ids = _default_ids(tok, prompt)
    first = table[table.layer == 0].sort_values("position")
    assert first.input_id.tolist() == ids
    assert first.role.tolist()[: convention.of(tok).first] == ["special"] * convention.of(tok).first
    last = table[(table.layer == adapter.num_layers) & (table.position == len(ids) - 1)]
    with torch.no_grad():
        expect = adapter.model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)[0, -1]
    assert int(last.id_1.iloc[0]) == int(expect)


def test_special_positions_are_not_scored(setting, eager_kl):
    adapter, tok = setting
    lenses = {"logit": LogitLens(adapter)}
    result = calibration_view(adapter, tok, lenses, [TEXT], num_positions=40, seq_len=16)
    first = convention.of(tok).first
    usage = result.usage[0]
    assert usage.used == 40
    assert ("not scored" in " ".join(usage.notes)) == bool(first)
    # the held-out evaluation leaves the prefix out too: equal to evaluating the blocks from position 1 on
    _, held = make_blocks([TEXT] * 6, tok, 32, max_eval_blocks=2)
    kl = evaluate(adapter, lenses, held, tok).kl["logit"]
    assert torch.isfinite(kl).all()
    if first:
        with_bos_scored = evaluate(adapter, lenses, held, tok, first=0).kl["logit"]
        assert not torch.allclose(kl, with_bos_scored)


def test_jacobian_prompts_start_as_the_tokenizer_does(setting):
    _, tok = setting
    prompts = corpus_prompts([TEXT] * 20, tok, 3, seq_len=40, min_chars=10)
    assert len(prompts) == 3
    for p in prompts:
        assert (p[0] == BOS) == bool(convention.of(tok).first)
        assert not p[1:].eq(BOS).any()


def test_a_lens_is_refused_under_another_convention(capsys):
    adapter = tiny_adapter("llama", vocab_size=97)
    lens = TunedLens.for_model(adapter)
    lens.config["input"] = convention.of(BosCharTokenizer()).record()
    found = convention.check_lens(lens.config, BosCharTokenizer())
    assert found is None
    with pytest.raises(LensMismatchError, match="--no-strict"):
        convention.check_lens(lens.config, CharTokenizer())
    assert "read anyway" in convention.check_lens(lens.config, CharTokenizer(), strict=False)
    # a Jacobian lens whose fit never used the first positions is read, with a note
    jconfig = {"lens": "jacobian", "skip_first": 16, "input": {"prefix": [1]}}
    assert "never used" in convention.check_lens(jconfig, CharTokenizer())
    assert convention.check_lens({"lens": "tuned"}, CharTokenizer()) is None  # records none: nothing to check


def test_select_lenses_checks_the_convention(tmp_path):
    adapter = tiny_adapter("llama", vocab_size=97)
    lens = TunedLens.for_model(adapter)
    lens.config["input"] = convention.InputConvention((BOS,)).record()
    lens.save_pretrained(tmp_path / "lens")
    assert set(select_lenses(str(tmp_path / "lens"), adapter, tokenizer=BosCharTokenizer())) == {"logit", "tuned"}
    with pytest.raises(LensMismatchError):
        select_lenses(str(tmp_path / "lens"), adapter, tokenizer=CharTokenizer())


def test_load_lens_with_a_tokenizer_checks_the_convention(tmp_path):
    from lenses import load_lens

    adapter = tiny_adapter("llama", vocab_size=97)
    lens = TunedLens.for_model(adapter)
    lens.config["input"] = convention.InputConvention((BOS,)).record()
    lens.save_pretrained(tmp_path / "lens")
    assert load_lens(tmp_path / "lens", adapter, tokenizer=BosCharTokenizer()).config["input"]["prefix"] == [BOS]
    with pytest.raises(LensMismatchError, match="prefix"):
        load_lens(tmp_path / "lens", adapter, tokenizer=CharTokenizer())
    assert load_lens(tmp_path / "lens", adapter, strict=False, tokenizer=CharTokenizer()) is not None


def test_training_blocks_start_with_bos_which_is_never_in_the_loss(tmp_path, eager_kl, monkeypatch):
    from lenses.jobs import train as train_module
    from lenses.jobs.train import TrainConfig, train

    seen = []
    real = train_module.lens_kl_backward

    def spy(lens, hidden, *args, **kwargs):
        seen.append(hidden.shape[1])
        return real(lens, hidden, *args, **kwargs)

    monkeypatch.setattr(train_module, "lens_kl_backward", spy)
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = TrainConfig(corpus=str(tmp_path / "corpus.txt"), out=str(tmp_path / "run"), seq_len=16, batch_size=4,
                      steps=2, optimizer="adam", lr=1e-2, compute_dtype="float32", progress=False, max_eval_tokens=64)
    result = train(cfg, model=tiny_adapter("llama", vocab_size=97).model, tokenizer=BosCharTokenizer())
    assert seen == [4 * 15, 4 * 15]  # 4 blocks of 16 tokens, position 0 (<bos>) left out of the loss
    assert result.lens.config["input"]["prefix"] == [BOS]
