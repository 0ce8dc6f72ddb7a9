"""Chat models read as they are used: a user turn wrapped in the tokenizer's chat template (the role of
every token kept), and the tokens a model generates after a prompt.

    turn = chat_turn(tokenizer, "What is the capital of France?", system=None)
    turn.ids, turn.roles   # roles: "template" (markup the template adds), "system", "user", "assistant"
    ids = generate(model, turn.ids, 20)                 # greedy; generate(..., sample=True, seed=0) samples

The views score answers from ``turn.answer_start`` (the assistant turn's first token) on, never inside
the template's markup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import LensesError

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
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def generate(model, ids: list[int], n: int, sample: bool = False, seed: int = 0, eos: int | None = None) -> list[int]:
    """``n`` tokens after ``ids`` (fewer if ``eos`` comes first), one full forward pass per token: the top-1 of
    the model's logits, or with ``sample`` a draw from their softmax (a generator seeded with ``seed``)."""
    if not isinstance(n, int) or n < 1:
        raise LensesError(f"--generate needs a positive number of tokens (got {n!r}).")
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out], device=device), use_cache=False).logits[0, -1].float()
            if sample:
                nxt = int(torch.multinomial(torch.softmax(logits.cpu(), -1), 1, generator=g))
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            if eos is not None and nxt == eos:
                break
    return out[len(ids):]
