"""Chat models read as they are used: a user turn wrapped in the tokenizer's chat template (the role of
every token kept), and the tokens a model generates after a prompt.

    turn = chat_turn(tokenizer, "What is the capital of France?", system=None)
    turn.ids, turn.roles   # roles: "template" (markup the template adds), "system", "user", "assistant"
    ids = generate(model, turn.ids, 20)                 # greedy; generate(..., sample=True, seed=0) samples

The views score answers from ``turn.answer_start`` (the assistant turn's first token) on, never inside
the template's markup.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field

import torch

from lenses.base import door
from lenses.base.errors import LensesError, first_line
from lenses.base.io import cache_dir
from lenses.text import corpora
from lenses.text.corpora import GENERATED
from lenses.text.data import read_texts

CHAT_MODES = ("auto", "on", "off")
CHAT_NAME = re.compile(r"instruct|chat|[-_]it\b|[-_]sft|[-_]dpo|assistant", re.I)


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_template(mode: str, tokenizer, model_name: str, system: str | None = None) -> tuple[bool, str]:
    """Whether to wrap prompts in the chat template, and why (for the report). ``auto``: on when the
    tokenizer has a template and the model's name says it is an instruct/chat model."""
    if mode not in CHAT_MODES:
        raise LensesError(f"unknown --chat-template {mode!r}; use {', '.join(CHAT_MODES)}.")
    if mode == "on" and not has_template(tokenizer):
        raise LensesError("--chat-template on: this model's tokenizer has no chat template; read raw text "
                          "(--chat-template off) or use a chat model.")
    on = mode == "on" or (mode == "auto" and has_template(tokenizer) and bool(CHAT_NAME.search(model_name or "")))
    if system is not None and not on:
        raise LensesError("--system needs the chat template, which is off here (--chat-template "
                          f"{mode}{', and the tokenizer has none' if not has_template(tokenizer) else ''}); "
                          "drop --system or use --chat-template on with a chat model.")
    if mode == "auto":
        why = ("the tokenizer has a chat template and the model is an instruct/chat model" if on else
               "the tokenizer has no chat template" if not has_template(tokenizer) else
               "the model's name does not say instruct/chat")
        return on, f"chat template {'on' if on else 'off'} (auto: {why})"
    return on, f"chat template {mode}"


@dataclass
class ChatTurn:
    """Token ids of one templated user turn (with the assistant's generation prompt) and, after it, any
    answer tokens; ``roles`` names each token's part."""

    ids: list[int]
    roles: list[str] = field(default_factory=list)

    @property
    def answer_start(self) -> int:
        """Index of the assistant turn's first token (the length of the prompt part)."""
        return next((i for i, r in enumerate(self.roles) if r in ("assistant", "generated")), len(self.ids))


def chat_turn(tokenizer, user: str, system: str | None = None, answer_ids: list[int] | None = None) -> ChatTurn:
    """``user`` (and ``system``) through the tokenizer's chat template with the generation prompt, then
    ``answer_ids`` as the assistant's tokens. A token is ``user``/``system`` when its characters lie inside
    that message's text in the rendered template, else ``template``."""
    if not has_template(tokenizer):
        raise LensesError("this tokenizer has no chat template; read raw text (--chat-template off).")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template raises what its author wrote (jinja's TemplateError, ...)
        fix = "drop --system (system=None)" if system is not None else "read raw text (--chat-template off)"
        raise LensesError(f"the model's chat template refuses these messages ({type(e).__name__}: "
                          f"{first_line(e, 160)}); {fix}.") from e
    spans = {"user": rendered.rfind(user)}
    if system is not None:
        spans["system"] = rendered.find(system)
    texts = {"user": user, "system": system}
    for role, start in spans.items():
        if start < 0:
            raise LensesError(f"the chat template does not keep the {role} message as it is; this model's template "
                              "cannot be read position by position (--chat-template off).")
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    roles = []
    for a, b in enc.offset_mapping:
        role = "template"
        for name, start in spans.items():
            if start <= a and b <= start + len(texts[name]) and b > a:
                role = name
        roles.append(role)
    answer_ids = list(answer_ids or [])
    return ChatTurn(list(enc.input_ids) + answer_ids, roles + ["assistant"] * len(answer_ids))


MAX_GENERATE = 4096  # the most tokens --generate / `generate` writes in one call


def generation_bound(model, prompt_len: int) -> int:
    """How many tokens may follow a prompt of ``prompt_len``: `MAX_GENERATE`, and no further than the
    positions the model's config states (``max_position_embeddings``, ``n_positions``, ``n_ctx``)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    stated = [getattr(config, a) for a in ("max_position_embeddings", "n_positions", "n_ctx")
              if isinstance(getattr(config, a, None), int)]
    return min([MAX_GENERATE] + [s - prompt_len for s in stated])


def generate(model, ids: list[int], n: int, sample: bool = False, seed: int = 0, eos: int | None = None,
             progress: bool = False) -> list[int]:
    """``n`` tokens after ``ids`` (fewer if ``eos`` comes first): the top-1 of the model's logits, or with
    ``sample`` a draw from their softmax (a generator seeded with ``seed``). One pass over the prompt, then one
    token at a time from the model's KV cache (a full pass per token for a model that returns no cache).
    ``n`` is bounded by `generation_bound` (checked before the model runs)."""
    from tqdm.auto import tqdm

    door.module("model", model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = door.token_ids("ids", ids, vocab, dims=1).tolist()
    if not ids:
        raise door.ArgumentError("ids must hold at least one token (the prompt); tokenize a text first.")
    bound = generation_bound(model, len(ids))
    if bound < 1:
        raise door.ArgumentError(f"a prompt of {len(ids)} tokens leaves no room to generate: the model has "
                                 f"{bound + len(ids)} positions; shorten the prompt.")
    n = door.integer("n (--generate)", n, 1, bound)
    sample, seed = door.boolean("sample", sample), door.integer("seed", seed, 0, 2**63 - 1)
    eos = door.optional_int("eos", eos)
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = list(ids)
    bar = tqdm(total=n, desc="generating", unit="token", disable=not progress or n < 64)
    with torch.no_grad():
        res = model(input_ids=torch.tensor([out], device=device), use_cache=True)
        for _ in range(n):
            logits = res.logits[0, -1].float()
            nxt = (int(torch.multinomial(torch.softmax(logits.cpu(), -1), 1, generator=g)) if sample
                   else int(logits.argmax()))
            out.append(nxt)
            bar.update(1)
            if (eos is not None and nxt == eos) or len(out) - len(ids) == n:
                break
            cache = getattr(res, "past_key_values", None)
            if cache is not None:
                res = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=cache, use_cache=True)
            else:
                res = model(input_ids=torch.tensor([out], device=device), use_cache=False)
    bar.close()
    return out[len(ids):]


def generate_batch(model, prompts: list[list[int]], n: int, eos: int | None = None,
                   pad: int | None = None) -> list[list[int]]:
    """Greedy answers to several prompts at once (`generate` for one): the prompts left-padded with an
    attention mask, through transformers' ``model.generate``; each answer ends at ``eos`` (kept) or after
    ``n`` tokens. About 8x the answers per second of one at a time for SmolLM2 on a 2-core CPU (32 prompts);
    measured equal to `generate` token for token there, though padding may change a near-tie's winner."""
    if not isinstance(n, int) or n < 1:
        raise LensesError(f"--generate needs a positive number of tokens (got {n!r}).")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None,
                             top_k=None)
    answers = []
    for row in out[:, width:].tolist():
        answers.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
    return answers


# ---- a corpus the model writes itself (for lenses of chat models) --------------------------------------------

ANSWER_TOKENS = 64  # tokens the model writes per prompt
PROMPT_CHARS = 300  # the user turn: the start of a document of SOURCE, cut at a word
GENERATE_BATCH = 32  # prompts answered together (answers depend on the batch only through rounding)


def is_generated(corpus: str | None) -> bool:
    return isinstance(corpus, str) and corpus.startswith(GENERATED)


def parse_generated(corpus: str) -> tuple[int, str | None]:
    """``generated:N[:SOURCE]`` -> (N, SOURCE or None for the default corpus)."""
    head, _, source = corpus[len(GENERATED):].partition(":")
    if not head.isdigit() or int(head) < 1:
        raise LensesError(f"--corpus {corpus!r}: write generated:N or generated:N:SOURCE with N >= 1 prompts "
                          "(e.g. generated:500 or generated:500:books).")
    return int(head), source or None


def read_corpus(corpus: str | None, adapter, tokenizer, seed: int = 0, progress: bool = False) -> list[str]:
    """The documents of ``--corpus``, read the same way by every job (training, the J-lens fit, the views):
    ``generated:N[:SOURCE]`` are chat transcripts the model writes itself (`generated_corpus`), anything else
    is read by `lenses.text.data.read_texts` (none: the default corpus)."""
    if is_generated(corpus):
        return generated_corpus(adapter, tokenizer, corpus, seed=seed, progress=progress)
    return read_texts(corpus)


def generated_corpus(adapter, tokenizer, corpus: str, seed: int = 0, system: str | None = None,
                     progress: bool = False) -> list[str]:
    """The documents of ``--corpus generated:N[:SOURCE]``: N chat transcripts the model writes itself. Each
    prompt is the start of a document of SOURCE (`PROMPT_CHARS`, drawn with ``seed``) as the user turn of
    the chat template; the model answers greedily (`ANSWER_TOKENS` tokens, or to its end-of-turn); the
    document is the rendered template with the answer. Cached in the lenses cache folder, one JSON line per
    transcript, keyed by the model's fingerprint, the settings and the source's contents (not its name): an
    interrupted run resumes at the first missing transcript, and a cache made by another model, other settings
    or an edited source is never read."""
    from tqdm.auto import tqdm

    n, source = parse_generated(corpus)
    if not has_template(tokenizer):
        raise LensesError(f"--corpus {corpus}: the model's tokenizer has no chat template, so there is no chat to "
                          "generate; train on text (--corpus wikipedia) instead.")
    docs = [d for d in read_texts(source) if len(d.strip()) >= 40]
    contents = hashlib.sha256("\0".join(docs).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    key = {"fingerprint": adapter.fingerprint(), "source": corpora.resolve_name(source), "contents": contents,
           "seed": seed, "system": system, "answer_tokens": ANSWER_TOKENS, "prompt_chars": PROMPT_CHARS,
           "batch": GENERATE_BATCH}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "generated" / f"{digest}.jsonl"
    done = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                break  # a line cut by an interruption: made again from here
    if len(done) < n:
        done = done[:len(done) - len(done) % GENERATE_BATCH]  # batches start at multiples: the same text as unbroken
        random.Random(seed).shuffle(docs)
        if len(docs) < n:
            raise LensesError(f"--corpus {corpus}: {corpora.resolve_name(source)} gives {len(docs)} documents, fewer "
                              f"than the {n} prompts asked for; ask for at most {len(docs)}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        todo = docs[len(done):len(done) + -(-(n - len(done)) // GENERATE_BATCH) * GENERATE_BATCH]
        bar = tqdm(total=len(todo), desc="generating", unit="answer", disable=not progress)
        with open(path, "w", encoding="utf-8") as f:  # rewritten whole lines only, then appended a batch at a time
            for text in done:
                f.write(json.dumps({"text": text}) + "\n")
            for start in range(0, len(todo), GENERATE_BATCH):
                turns = [chat_turn(tokenizer, doc.strip()[:PROMPT_CHARS].rsplit(" ", 1)[0], system)
                         for doc in todo[start:start + GENERATE_BATCH]]
                answers = generate_batch(adapter.model, [t.ids for t in turns], ANSWER_TOKENS,
                                         eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
                for turn, answer in zip(turns, answers):
                    text = tokenizer.decode(turn.ids + answer)
                    f.write(json.dumps({"text": text}) + "\n")
                    done.append(text)
                f.flush()
                bar.update(len(turns))
        bar.close()
    return done[:n]
