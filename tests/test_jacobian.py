"""The Jacobian lens: the fit against brute-force autograd (float64), closed forms, readout identities,
file formats and bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_adapter, tiny_model

from lenses import JacobianLens, LogitLens, ModelAdapter, load_lens
from lenses.base.errors import CorruptFileError, LensesError, LensMismatchError
from lenses.jobs.jlens_estimator import fit_prompts, prompt_jacobian
from lenses.model.intervene import edit_residual


def brute_force(adapter, ids, k, skip_first):
    """The definition, one output dimension at a time (torch.autograd.functional.jacobian of the model run
    from a free ``hidden[k]``): mean over sources t in V of the sum over targets t' in V."""
    base = adapter.hidden_states(torch.tensor([ids]))[k]  # [1, T, d]
    full = torch.autograd.functional.jacobian(lambda x: _last(adapter, ids, k, x), base)[0, :, :, 0]  # [T', d, T, d]
    V = range(skip_first, len(ids) - 1)
    return sum(full[tp, :, t, :] for t in V for tp in V) / len(V)


def _last(adapter, ids, k, x):
    captured = {}
    L = adapter.num_layers

    def grab(h):
        captured["h"] = h
        return h

    with edit_residual(adapter, {k: lambda h: x, L: grab}):
        adapter.run_stream(torch.tensor([ids]), grad=True)
    return captured["h"]


def rms_norm_in_input_dtype(self, hidden_states):
    """HF's Llama RMSNorm computes in float32 even for a float64 model; the oracle needs float64 throughout."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.slow
@pytest.mark.ci  # over ~3 s: out of the fast tier, in CI
def test_fit_equals_brute_force_float64(family, monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    model = tiny_model(family).double()
    adapter = ModelAdapter.from_model(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 90, (n,), generator=g).tolist() for n in (22, 25)]
    lens = fit_prompts(adapter, prompts, layers=[0, 1, 2], skip_first=16, dim_batch=5)
    for k in (0, 1, 2):
        want = sum(brute_force(adapter, p, k, 16) for p in prompts) / len(prompts)
        torch.testing.assert_close(lens.matrices[k].double(), want, atol=1e-8, rtol=0)
    # a short sequence with skip_first=2 (reference default is 16)
    short = [3, 7, 11, 5, 9, 2]
    J = prompt_jacobian(adapter, torch.tensor(short), [1], skip_first=2, dim_batch=3)[0]
    torch.testing.assert_close(J, brute_force(adapter, short, 1, 2), atol=1e-8, rtol=0)


class CumsumBlock(torch.nn.Module):
    """h[t] -> sum_{s <= t} h[s]: a causal block whose Jacobian is known in closed form."""

    def forward(self, hidden_states, **kwargs):
        return hidden_states.cumsum(1)


class CumsumModel(torch.nn.Module):
    def __init__(self, d=4, vocab=10, layers=2):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(layers - 1)] + [CumsumBlock()])
        self.norm = torch.nn.Identity()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids, **kwargs):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


def test_cumsum_block_gives_closed_form():
    """With a last block h -> cumsum(h), d out[t'] / d in[t] = I for t <= t', so J = (|V| + 1) / 2 * I."""
    torch.manual_seed(0)
    model = CumsumModel().double()
    head = torch.nn.Linear(4, 10, bias=False).double()
    adapter = ModelAdapter(model, model.layers, model.norm, head)
    T, skip = 30, 16
    J = prompt_jacobian(adapter, torch.arange(T) % 10, [1], skip_first=skip, dim_batch=4)[0]
    n_valid = T - 1 - skip
    torch.testing.assert_close(J, (n_valid + 1) / 2 * torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_readout_identities():
    model = tiny_model("llama")
    adapter = ModelAdapter.from_model(model)
    L, d = adapter.num_layers, adapter.d_model
    lens = JacobianLens.from_matrices({k: torch.eye(d) for k in range(L)}, L, model=adapter)
    ids = torch.randint(1, 90, (1, 12))
    hidden = adapter.hidden_states(ids)
    logit = LogitLens(adapter)
    for k in range(L + 1):
        torch.testing.assert_close(lens(hidden[k], k), logit(hidden[k], k))
    torch.testing.assert_close(lens(hidden[L], L), model(ids).logits.float(), atol=1e-5, rtol=1e-5)
    # a real transport: h @ J.T then the model's final norm and unembedding
    J = torch.randn(d, d)
    lens.matrices[1] = J
    torch.testing.assert_close(lens(hidden[1], 1), logit(hidden[1] @ J.T, L))


def test_absent_layers_are_nan_not_logit_lens():
    adapter = tiny_adapter("llama")
    lens = JacobianLens.from_matrices({2: torch.eye(adapter.d_model)}, adapter.num_layers, model=adapter)
    h = adapter.hidden_states(torch.randint(1, 90, (1, 6)))
    assert not lens.has_layer(0) and not lens.has_layer(1) and lens.has_layer(2) and lens.has_layer(3)
    assert torch.isnan(lens(h[1], 1)).all()
    stack = lens.transform_stack(h[:3])
    assert torch.isnan(stack[:2]).all() and torch.isfinite(stack[2]).all()


def _fitted(adapter, n=2):
    g = torch.Generator().manual_seed(1)
    return fit_prompts(adapter, [torch.randint(1, 90, (20,), generator=g) for _ in range(n)], skip_first=16)


def test_file_formats_round_trip(tmp_path):
    adapter = tiny_adapter("llama")
    lens = _fitted(adapter)
    # the published format: reference layer i = our hidden[i + 1], float16
    lens.save_published(tmp_path / "j.pt")
    raw = torch.load(tmp_path / "j.pt", weights_only=True)
    assert sorted(raw["J"]) == [0, 1] and raw["J"][0].dtype == torch.float16 and raw["n_prompts"] == 2
    torch.testing.assert_close(raw["J"][0].float(), lens.matrices[1].half().float())
    back = load_lens(tmp_path / "j.pt", adapter)
    assert isinstance(back, JacobianLens) and back.layers == [1, 2] and back.n_prompts == 2
    torch.testing.assert_close(back.matrices, lens.matrices.half().float())
    # our folder format
    lens.save_pretrained(tmp_path / "ours")
    again = load_lens(tmp_path / "ours", adapter)
    assert isinstance(again, JacobianLens) and again.layers == [1, 2]
    torch.testing.assert_close(again.matrices, lens.matrices.half().float())
    # the reference's fit checkpoint: mean = sum / n_done
    sums = {0: 3 * lens.matrices[1], 1: 3 * lens.matrices[2]}
    torch.save({"jacobian_sum": sums, "n_done": 3, "next_idx": 3, "source_layers": [0, 1], "target_layer": 2,
                "skip_first": 16}, tmp_path / "ckpt.pt")
    ck = load_lens(tmp_path / "ckpt.pt", adapter)
    torch.testing.assert_close(ck.matrices[1:], lens.matrices[1:], atol=1e-6, rtol=1e-6)
    # subset and merge (n_prompts-weighted)
    sub = lens.subset([2])
    assert sub.layers == [2]
    other = _fitted(adapter, n=1)
    merged = JacobianLens.merge(lens, other)
    torch.testing.assert_close(merged.matrices[1], (2 * lens.matrices[1] + other.matrices[1]) / 3)
    assert merged.n_prompts == 3


def test_bad_files(tmp_path):
    adapter = tiny_adapter("llama")
    d, L = adapter.d_model, adapter.num_layers
    torch.save({"J": {0: torch.eye(d + 1)}, "n_prompts": 1, "source_layers": [0], "d_model": d + 1}, tmp_path / "w.pt")
    with pytest.raises(LensMismatchError, match="width"):
        load_lens(tmp_path / "w.pt", adapter)
    torch.save({"J": {L - 1: torch.eye(d)}, "n_prompts": 1, "source_layers": [L - 1], "d_model": d}, tmp_path / "l.pt")
    with pytest.raises(LensMismatchError, match="deeper"):
        load_lens(tmp_path / "l.pt", adapter)
    torch.save({"jacobian_sum": {0: torch.eye(d)}, "n_done": 0, "next_idx": 0, "source_layers": [0],
                "target_layer": L - 1, "skip_first": 16}, tmp_path / "c.pt")
    with pytest.raises(CorruptFileError, match="n_done = 0"):
        load_lens(tmp_path / "c.pt", adapter)
    torch.save({"J": {"a": torch.eye(d)}, "n_prompts": 1}, tmp_path / "keys.pt")
    with pytest.raises(CorruptFileError, match="not layer numbers"):
        load_lens(tmp_path / "keys.pt", adapter)
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(CorruptFileError, match="not a Jacobian lens"):
        load_lens(tmp_path / "other.pt", adapter)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"J": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CorruptFileError, match="never runs code"):
        load_lens(tmp_path / "evil.pt", adapter)
    lens = _fitted(adapter)
    with pytest.raises(LensesError, match="not in this Jacobian lens"):
        lens.subset([0])


# --------------------------------------------------------------------------- TransformerLens 4.3 as a reference


@pytest.fixture(scope="module")
def tl_pair(tmp_path_factory):
    """The same tiny Llama as a TransformerLens bridge and as our adapter, with TL's prompts (BOS first)."""
    pytest.importorskip("transformer_lens", reason="transformer-lens==4.3.0 (the 'tl' test extra) is not installed")
    from tiny_models import save_tiny_model
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path_factory.mktemp("tl") / "llama", "llama")
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    bridge.eval()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval().requires_grad_(False)
    texts = ["The quick brown fox jumps over the lazy dog, twice.", "Lenses read every layer of a model in turn."]
    return bridge, ModelAdapter.from_model(model), texts, [bridge.to_tokens(t)[0] for t in texts]


def test_fit_and_readout_equal_transformer_lens(tl_pair, tmp_path):
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens as TLJacobianLens

    bridge, adapter, texts, ids = tl_pair
    theirs = TLJacobianLens.fit(bridge, texts, corpus="test", dim_batch=8, max_seq_len=128, show_progress=False)
    ours = fit_prompts(adapter, ids, dim_batch=8)
    assert theirs.n_prompts == ours.n_prompts == 2 and theirs.source_layers == [k - 1 for k in ours.layers]
    for k in ours.layers:
        torch.testing.assert_close(ours.matrices[k], theirs.jacobians[k - 1], atol=1e-5, rtol=1e-5)
    # readout: full logits at every fitted layer and at the last
    read = theirs.readout(bridge, ids[0][None], return_full_logits=True)
    hidden = adapter.hidden_states(ids[0][None])[:, 0]
    for k in ours.layers + [adapter.num_layers]:
        torch.testing.assert_close(ours(hidden[k], k), read.lens_logits[k - 1].float(), atol=1e-5, rtol=1e-5)
    # files: theirs load in ours, ours in theirs
    theirs.save(str(tmp_path / "tl.pt"))
    from_tl = load_lens(tmp_path / "tl.pt", adapter)
    torch.testing.assert_close(from_tl.matrices[1:], ours.matrices[1:].half().float(), atol=2e-3, rtol=2e-3)
    ours.save_published(tmp_path / "ours.pt")
    into_tl = TLJacobianLens.load(str(tmp_path / "ours.pt"))
    assert into_tl.source_layers == theirs.source_layers and into_tl.n_prompts == 2
    for k in ours.layers:
        torch.testing.assert_close(into_tl.jacobians[k - 1], ours.matrices[k].half().float())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gpt_neox"])
def test_cached_prefix_equals_full_run(family):
    """The prefix served from a key/value cache changes no number (float32, rounding only)."""
    adapter = tiny_adapter(family)
    ids = torch.randint(1, 90, (30,), generator=torch.Generator().manual_seed(2))
    a = prompt_jacobian(adapter, ids, [1, 2], skip_first=16, dim_batch=8, prefix_cache=True)
    b = prompt_jacobian(adapter, ids, [1, 2], skip_first=16, dim_batch=8, prefix_cache=False)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
