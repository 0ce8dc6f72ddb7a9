"""How a model is fed text in use: the special tokens its tokenizer adds with its defaults.

``tokenizer(text)`` is what a user, ``model.generate`` and every evaluation harness feed a model. Many
tokenizers add a beginning-of-sequence token there (Gemma, Llama-3, Mistral, OLMo-2: ``<bos>`` first);
some add nothing (SmolLM2, GPT-2). A model read without its BOS is another model: Gemma-3-270m recalls
0 of 100 facts without it and 21 with it. So every path of lenses (views, grid, training blocks, the
J-lens fit, causal checks, representation metrics) encodes through one `InputConvention`:

1. a prompt or text is ``prefix + tokenizer(text, add_special_tokens=False)``, the prefix being what the
   tokenizer adds before the text with its defaults (found by comparing both encodings of a probe text);
2. what the tokenizer adds *after* the text (a suffix: rare for causal LMs) is recorded, never fed: a
   prompt is read to predict what comes next, and an end-of-sequence token would end it;
3. a continuation (an answer's tokens, an option letter) is encoded plainly, without the prefix;
4. packed blocks of a corpus each start with the prefix, then ``seq_len - len(prefix)`` tokens of text;
5. the prefix positions (``first`` of them) are special tokens: they are left out of every statistic and
   of the training loss, and the tables say so;
6. a lens records the convention it was made with (``config["input"]``); reading it under another is
   refused (`check_lens`), unless the user says it is a close variant (``strict=False``).
Chat templates render their own special tokens (`lenses.text.chat`): text rendered by a template is encoded
with ``add_special_tokens=False``, as ``apply_chat_template(tokenize=True)`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from lenses.base.errors import DataError, LensMismatchError

_PROBE = "The quick brown fox"


@dataclass(frozen=True)
class InputConvention:
    """The ids ``tokenizer(text)`` puts before (``prefix``) and after (``suffix``) a text's own ids."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @property
    def first(self) -> int:
        """How many leading positions of an encoded text are the tokenizer's special tokens."""
        return len(self.prefix)

    def encode(self, tokenizer, text: str) -> list[int]:
        """``text`` as the model sees it in use: the prefix, then the text's ids (rule 1)."""
        return list(self.prefix) + plain_ids(tokenizer, text)

    def record(self, tokenizer=None) -> dict:
        """What a lens's config keeps: the ids, and their text where a tokenizer is given."""
        out = {"prefix": list(self.prefix), "suffix": list(self.suffix)}
        if tokenizer is not None and self.prefix:
            out["prefix_text"] = tokenizer.decode(list(self.prefix))
        return out

    def describe(self) -> str:
        return f"prefix {list(self.prefix)}" if self.prefix else "no prefix"


def plain_ids(tokenizer, text: str) -> list[int]:
    """``text``'s own ids, no special tokens (a continuation: rule 3)."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def single_token(tokenizer, text: str) -> int:
    """The id of ``text`` when the tokenizer reads it as one token; otherwise a `DataError` naming its pieces."""
    ids = plain_ids(tokenizer, text)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise DataError(f"{text!r} is {len(ids)} tokens for this tokenizer ({pieces}), not one; give a single "
                        "token (often with its leading space, e.g. ' Paris'), such as its first piece "
                        f"{pieces[0] if pieces else ''!r}.")
    return ids[0]


def of(tokenizer) -> InputConvention:
    """The convention of ``tokenizer`` (computed once per tokenizer object)."""
    cached = getattr(tokenizer, "_lenses_convention", None)
    if isinstance(cached, InputConvention):
        return cached
    plain = plain_ids(tokenizer, _PROBE)
    full = list(tokenizer(_PROBE).input_ids)
    conv = InputConvention()
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            conv = InputConvention(tuple(full[:start]), tuple(full[start + len(plain):]))
            break
    try:
        tokenizer._lenses_convention = conv
    except (AttributeError, TypeError):
        pass
    return conv


def encode(tokenizer, text: str) -> list[int]:
    """``tokenizer(text)``'s ids as the model sees them (prefix included, suffix never: rules 1-2)."""
    return of(tokenizer).encode(tokenizer, text)


def from_record(record) -> InputConvention | None:
    """The convention a lens's config records, or None for a lens that records none."""
    if not isinstance(record, dict) or not isinstance(record.get("prefix"), list):
        return None
    return InputConvention(tuple(int(i) for i in record["prefix"]), tuple(int(i) for i in record.get("suffix", [])))


def check_lens(config: dict, tokenizer, name: str = "the lens", strict: bool = True) -> str | None:
    """Refuse (rule 6) a lens made under another input convention than ``tokenizer``'s; return a note for a
    lens that records none, or for a Jacobian lens whose fit never used the differing positions."""
    made = from_record(config.get("input"))
    now = of(tokenizer)
    if made is None:
        return None
    if made.prefix == now.prefix:
        return None
    skip = int(config.get("skip_first") or 0) if config.get("lens") == "jacobian" else 0
    if skip >= max(made.first, now.first) or not strict:
        return (f"note: {name} was made with input {made.describe()}, this tokenizer adds {now.describe()}"
                + (f"; its fit never used the first {skip} positions as sources or targets" if skip else
                   "; read anyway (not strict)"))
    raise LensMismatchError(
        f"{name} was made on inputs with {made.describe()} but this model's tokenizer adds {now.describe()}: "
        "its translators learned other states. Train a lens on this model as it is used, or pass --no-strict "
        "(strict=False) to read it as a close variant.")
