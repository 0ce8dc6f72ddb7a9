"""Text in, token blocks out: reading corpora, packing, the held-out split.

The named corpora (Wikipedia lead sections, the default; Gutenberg books; Python-docs prose) are
described and built in `lenses.text.corpora`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

import torch

from lenses.base import schema
from lenses.base.errors import DataError
from lenses.text import convention, corpora

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


# --------------------------------------------------------------------------- reading


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}). Convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`, and pass the converted file."
        ) from e


def jsonl_records(path: Path) -> list[tuple[str, object]]:
    """``(where, object)`` for every non-blank line of a JSONL file (``where`` is ``path:line``)."""
    records = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that line.") from e
    return records


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    texts = []
    for where, record in jsonl_records(path):
        texts.append(schema.check(record, schema.corpus_line(field), where, f'{{"{field}": "..."}}')[field])
    return texts


SAVED_MARKS = ("dataset_info.json", "dataset_dict.json", "state.json")  # the files of a `save_to_disk` folder


def _read_saved_dataset(path: Path, field: str = "text") -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path} looks like a saved Hugging Face dataset: `pip install datasets` to read it.") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a folder it cannot read
        raise DataError(f"corpus {path} holds {', '.join(n for n in SAVED_MARKS if (path / n).exists())} but is not "
                        f"a dataset saved with save_to_disk ({type(e).__name__}: {str(e)[:120]}); pass a folder of "
                        ".txt/.jsonl files without that file, or the dataset's own folder.") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if field not in ds.column_names:
        raise DataError(f"dataset {path} has no column {field!r} (columns: {ds.column_names}).")
    return [t for t in ds[field] if isinstance(t, str)]


def read_texts(source: str | os.PathLike | None = None, field: str = "text") -> list[str]:
    """Documents of a named corpus (``wikipedia``, ``books``, ``pydocs``; see `lenses.text.corpora`), or of a
    .txt/.md file, a .jsonl file, a folder of those, or a `save_to_disk` dataset.

    ``None`` gives the default corpus, ``wikipedia`` (Python-docs prose with a notice if it is not installed).
    A name wins over a file of that name in the working folder: write ``./books`` for the folder.
    """
    if corpora.is_name(source):
        return corpora.named_documents(None if source is None else str(source))
    path = Path(source)
    if not path.exists():
        raise DataError(f"corpus {path} does not exist: pass a .txt/.jsonl file or a folder, or one of "
                        f"{', '.join(corpora.NAMES)} (--corpus).")
    if path.is_dir():
        if any((path / name).exists() for name in SAVED_MARKS):
            texts = _read_saved_dataset(path, field)
        else:
            texts = []
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix == ".jsonl":
                    texts += _read_jsonl(file, field)
                elif file.suffix in TEXT_SUFFIXES:
                    texts.append(read_utf8(file))
    elif path.suffix == ".jsonl":
        texts = _read_jsonl(path, field)
    else:
        texts = [read_utf8(path)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"corpus {path} contains no text. Pass a file or folder with .txt/.md/.jsonl documents.")
    return texts


# --------------------------------------------------------------------------- tokens


def document_ids(texts: Iterable[str], tokenizer, batch: int = 64) -> Iterator[list[int]]:
    """Each document's token ids (no special tokens), tokenized ``batch`` documents per call (a fast
    tokenizer works through a batch in parallel: about 3x faster than a call per document)."""
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, batch)):
        yield from tokenizer(chunk, add_special_tokens=False).input_ids


def tokenize(texts: Iterable[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """One token stream: each document's ids followed by EOS (the document separator)."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in document_ids(texts, tokenizer):
        ids += doc
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int, prefix: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
    """Cut a token stream into ``[n_blocks, seq_len]`` (the incomplete tail is dropped), each block starting
    with ``prefix`` (the tokenizer's own special tokens, `lenses.text.convention` rule 4) and then
    ``seq_len - len(prefix)`` tokens of the stream."""
    width = seq_len - len(prefix)
    if width < 1:
        raise DataError(f"a block of {seq_len} tokens has no room for text after the tokenizer's {len(prefix)} "
                        "special token(s): raise --seq-len.")
    n = stream.numel() // width
    body = stream[: n * width].view(n, width)
    if not prefix:
        return body
    head = torch.tensor(list(prefix), dtype=stream.dtype).expand(n, len(prefix))
    return torch.cat([head, body], dim=1)


def split_documents(texts: list[str], tokenizer, eval_fraction: float = 0.1):
    """The document-level split of `make_blocks`: ``(documents, token streams, cut)`` with the documents
    shuffled by a fixed seed (0); ``documents[cut:]`` (about ``eval_fraction`` of the tokens) are held out."""
    docs = list(texts)
    random.Random(0).shuffle(docs)
    sep = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    streams = [torch.tensor(ids + sep, dtype=torch.long) for ids in document_ids(docs, tokenizer)]
    total = sum(len(s) for s in streams)
    held_docs, held_tokens = 0, 0
    while held_docs < len(docs) - 1 and held_tokens < eval_fraction * total:
        held_docs += 1
        held_tokens += len(streams[-held_docs])
    return docs, streams, len(docs) - held_docs


def make_blocks(
    texts: list[str],
    tokenizer,
    seq_len: int,
    eval_fraction: float = 0.1,
    max_eval_blocks: int | None = None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out blocks, split by document: documents are shuffled with a fixed seed (0), the
    last ones (about ``eval_fraction`` of the tokens) are held out, and each side is packed on its own
    (each block starting as the model expects: the tokenizer's prefix, e.g. BOS, then text),
    so no document (no Wikipedia article) is on both sides and the split never depends on the
    training seed or on ``max_eval_blocks`` (which only caps the blocks evaluated). A corpus of one
    document (or too few to give both sides a block) is split inside its token stream instead: the
    last blocks are held out, at most ``max_eval_blocks``, and the rest is for training."""
    prefix = convention.of(tokenizer).prefix
    docs, streams, cut = split_documents(texts, tokenizer, eval_fraction)
    train = pack(torch.cat(streams[:cut]), seq_len, prefix) if cut else torch.empty(0, seq_len, dtype=torch.long)
    held_out = (pack(torch.cat(streams[cut:]), seq_len, prefix) if cut < len(docs)
                else torch.empty(0, seq_len, dtype=torch.long))
    if len(train) == 0 or len(held_out) == 0:  # too few documents: split the stream
        blocks = pack(torch.cat(streams) if streams else torch.empty(0, dtype=torch.long), seq_len, prefix)
        if len(blocks) < 2:
            raise DataError(
                f"the corpus gives {len(blocks)} block(s) of {seq_len} tokens; at least 2 are needed (one to "
                "train, one held out). Add text or lower --seq-len."
            )
        n_eval = max(1, round(eval_fraction * len(blocks)))
        if max_eval_blocks is not None:  # blocks not evaluated go to training
            n_eval = min(n_eval, max_eval_blocks)
        train, held_out = blocks[:-n_eval], blocks[-n_eval:]
    if max_eval_blocks is not None:  # held-out documents stay held out; the first blocks are evaluated
        held_out = held_out[:max_eval_blocks]
    if max_tokens is not None:
        train = train[: max(1, max_tokens // seq_len)]
    return train, held_out
