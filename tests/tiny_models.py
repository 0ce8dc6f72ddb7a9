"""Tiny random-weight causal LMs of every family we support (built in memory, nothing downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB, D, LAYERS, HEADS = 96, 32, 3, 4

# model_type -> extra config fields beyond the common small sizes
FAMILIES: dict[str, dict] = {
    "gpt2": dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=64),
    "gpt_neox": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64),
    "gptj": dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_positions=64),
    "opt": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=64, word_embed_proj_dim=D),
    "bloom": dict(hidden_size=D, n_layer=LAYERS, n_head=HEADS),
    "llama": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64),
    "mistral": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                    intermediate_size=64),
    "qwen2": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                  intermediate_size=64),
    "qwen3": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "gemma": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
                  intermediate_size=64, head_dim=8),
    "gemma2": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                   intermediate_size=64, head_dim=8, final_logit_softcapping=2.0),
    "gemma3_text": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                        intermediate_size=64, head_dim=8, final_logit_softcapping=2.0),
    "phi3": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64),
    "olmo2": dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random-weight model of ``family``; norms get random weights too so (1+w) and bias matter."""
    torch.manual_seed(seed)
    fields = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **FAMILIES[family],
              **overrides}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def random_lens(adapter, seed: int = 1, scale: float = 0.05):
    """A tuned lens with small random translators (so it differs from the logit lens)."""
    from lenses import TunedLens

    lens = TunedLens.for_model(adapter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(scale * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(scale * torch.randn(lens.bias.shape, generator=g))
    return lens


def byte_tokenizer(letters: bool = False):
    """A real (fast, Rust) Hugging Face tokenizer over the 256 bytes plus EOS (id 256), made offline;
    ``letters``: also the merged tokens " A" .. " D" (ids 257-260), as the multiple-choice view needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes that stand for themselves
    extra = iter(range(256, 512))
    byte_char = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    vocab = {byte_char[b]: b for b in range(256)} | {"<|endoftext|>": 256}
    merges = [(byte_char[32], c) for c in "ABCD"] if letters else []
    vocab |= {a + b: 257 + i for i, (a, b) in enumerate(merges)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_model(path, family: str = "llama", seed: int = 0, letters: bool = False):
    """A tiny random model of ``family`` with `byte_tokenizer`, saved as a Hugging Face folder."""
    torch.manual_seed(seed)
    ids = dict(pad_token_id=256, bos_token_id=256, eos_token_id=256)
    config = AutoConfig.for_model(family, vocab_size=261 if letters else 257, **ids,
                                  **{**FAMILIES[family], "max_position_embeddings": 512})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    byte_tokenizer(letters).save_pretrained(path)
    return path


def load_script(name: str):
    """A script of ``scripts/`` (e.g. ``"coverage"``) as a module, to test its functions."""
    path = Path(__file__).parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_interrupted(folder, keep=("checkpoint.pt", "jacobian_checkpoint.pt")):
    """Make a finished run's folder look interrupted before its end: every file but the checkpoint is
    removed and the mark says ``interrupted`` (what a run killed after its last checkpoint leaves)."""
    from lenses.base.io import update_mark

    folder = Path(folder)
    gone = [f for f in folder.iterdir() if f.is_file() and f.name not in keep and not f.name.startswith(".")]
    for f in gone:
        f.unlink()
    update_mark(folder, lambda m: m.update(state="interrupted",
                                           files=[f for f in m.get("files", []) if f in keep]))
    return folder


def tiny_adapter(family: str = "llama", seed: int = 0, **overrides):
    """`tiny_model` wrapped in its checked `ModelAdapter` (the setup most tests start from)."""
    from lenses.model.adapter import ModelAdapter

    return ModelAdapter.from_model(tiny_model(family, seed, **overrides))


TEXT = ("The quick brown fox jumps over the lazy dog, and the cat sat on the mat. " * 30 + "\n\n") * 8


def tiny_inputs(root, letters: bool = False):
    """What the CLI tests read, in ``root``: a tiny model folder with a real tokenizer (``model``), a corpus
    (``corpus.txt``, also ``my.txt``), a facts file (``facts.jsonl``) and an MMLU-layout file (``mcq.csv``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_model(root / "model", letters=letters)
    for name in ("corpus.txt", "my.txt"):
        (root / name).write_text(TEXT, encoding="utf-8")
    (root / "facts.jsonl").write_text('{"prompt": "The quick brown fox", "answer": "jumps"}\n', encoding="utf-8")
    rows = [f"Question {i}?,alpha,beta,gamma,delta,{'ABCD'[i % 4]}" for i in range(8)]
    (root / "mcq.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def run_analyze(argv, capsys):
    """``analyze.py argv`` run in this process through its own entry point (`run_cli`, as the script runs it): its
    exit status and what it printed, as ``subprocess.run`` would give them, without a new interpreter (~4 s)."""
    from types import SimpleNamespace

    from lenses.base.options import run_cli
    from lenses.commands import analyze

    try:
        rc = run_cli(analyze.main, [str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def two_loopback_nodes(args: list, port: int, cwd, env: dict, launcher: list | None = None) -> list:
    """Run ``launcher args`` as two torchrun node agents on this machine (``--nnodes 2``, one process each) that
    meet over 127.0.0.1 (c10d rendezvous), as two machines would; ``[(returncode, stdout, stderr)]`` per node."""
    import subprocess
    import sys

    launcher = launcher or [sys.executable, "-m", "torch.distributed.run"]

    def node(rank: int):
        cmd = [*launcher, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--rdzv-backend",
               "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"lenses-test-{port}", *map(str, args)]
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    agents = [node(0), node(1)]
    outs = [a.communicate(timeout=900) for a in agents]
    return [(a.returncode, *o) for a, o in zip(agents, outs)]
