"""The dequantised-GGUF cache: two processes filling it at once (two ranks, or a fit beside a training run)."""

import pytest
import torch
import transformers

from lenses.model.loading import _dequantise_gguf_to_cache


class _Tok:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def _tiny():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file whose 'dequantisation' gives a tiny Llama and a tokenizer that saves one file."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _tiny())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _Tok())
    return path


def test_losing_the_race_keeps_the_winners_folder(tmp_path, gguf):
    dest = tmp_path / "cache" / "m-123"
    _dequantise_gguf_to_cache(gguf, dest)  # the first process
    first = (dest / "model.safetensors").read_bytes()
    torch.manual_seed(1)
    _dequantise_gguf_to_cache(gguf, dest)  # a second one that finished later: no error, the folder stays whole
    assert (dest / "model.safetensors").read_bytes() == first
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # its temporary folder is gone


def test_a_real_failure_still_raises(tmp_path, gguf):
    dest = tmp_path / "cache" / "m-123"
    dest.mkdir(parents=True)
    (dest / "stray.txt").write_text("not a model folder")  # occupied, but not by a finished copy
    try:
        _dequantise_gguf_to_cache(gguf, dest)
    except OSError:
        pass
    else:
        raise AssertionError("expected the rename onto a foreign folder to fail")
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]


def test_a_half_precision_request_never_builds_a_float32_model(tmp_path, monkeypatch):
    """`--model-dtype bfloat16` on a GGUF: dequantised straight into a bfloat16 cache of its own (the
    model is built in bfloat16, tensor by tensor); a float32 cache already there is reused instead."""
    from safetensors import safe_open

    from lenses.model.loading import resolve_model_path

    monkeypatch.setenv("LENSES_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    built = []

    def fake_from_pretrained(*a, dtype=None, **k):
        built.append(dtype)
        return _tiny().to(dtype)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _Tok())
    half = resolve_model_path(path, torch.bfloat16)
    assert built == [torch.bfloat16] and half.endswith("-bfloat16")
    with safe_open(f"{half}/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    full = resolve_model_path(path)  # float32 asked: its own cache
    assert built == [torch.bfloat16, torch.float32] and full != half
    assert resolve_model_path(path, torch.bfloat16) == full  # now reused (cast while loading), nothing rebuilt
    assert len(built) == 2
