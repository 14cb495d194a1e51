"""Text sources (built-in, .txt, .jsonl, a local datasets directory) and packing them into fixed-length sequences."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.settings import BUILTIN_TEACHERS

BUILTIN_TEXTS = 4096  # built-in problems drawn per call (about 23 characters each; the reasoner's about 152)


def load_texts(source: str | Path, *, split: str = "train", seed: int = 0, text_field: str = "text") -> list[str]:
    """The texts of ``source``: "builtin" or "builtin-reasoner" (that built-in teacher's task suite's ``split``,
    prompt and answer), a .txt file (one text per paragraph, blank lines separate), a .jsonl file (field
    ``text_field``), or a directory written by ``datasets.save_to_disk``."""
    if str(source) in BUILTIN_TEACHERS:
        from ckaqad_cli.builtin import suite, tasks

        if split not in tasks.SPLITS:
            raise CkaqadError(f"--split of the built-in data must be one of {', '.join(tasks.SPLITS)}, not {split!r}")
        return [problem.text for problem in suite(str(source)).generate(split, BUILTIN_TEXTS, seed)]
    path = Path(source)
    if path.is_dir():
        texts = _datasets_dir(path, split, text_field)
    elif path.is_file() and path.suffix == ".jsonl":
        texts = _jsonl(path, text_field)
    elif path.is_file():
        try:
            texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        except (OSError, UnicodeDecodeError) as e:
            raise CkaqadError(f"cannot read {path} as UTF-8 text: {_reason(e)}") from None
    else:
        raise CkaqadError(f"data source {source} is not {' or '.join(map(repr, BUILTIN_TEACHERS))}, a file or a "
                          "directory")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CkaqadError(f"data source {source} holds no text")
    return texts


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; a line that is not JSON is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise CkaqadError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CkaqadError(f"cannot read {path} as UTF-8 JSON lines: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"byte {e.start} is not UTF-8 (a binary file?)"
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


def _jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for lineno, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise CkaqadError(f"{path}:{lineno} has no string field {field!r} (choose one with --text-field)")
        texts.append(row[field])
    return texts


def _datasets_dir(path: Path, split: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CkaqadError(f"{path} is a directory: reading a saved dataset needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise CkaqadError(f"{path} is not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CkaqadError(f"dataset {path} has no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    if field not in ds.column_names:
        raise CkaqadError(f"dataset {path} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    return list(ds[field])


def pack_sequences(texts: list[str], tokenizer, seq_len: int, *, max_tokens: int | None = None, seed: int = 0):
    """LongTensor [N, seq_len]: the texts, shuffled by ``seed``, joined with EOS and cut into rows.

    Each row starts with BOS when the tokenizer has one. Only whole rows are kept; ``max_tokens`` caps N * seq_len.
    """
    if seq_len < 2:
        raise CkaqadError(f"--seq-len must be at least 2, got {seq_len}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = seq_len - (bos is not None)
    rows_wanted = None if max_tokens is None else max_tokens // seq_len
    if rows_wanted == 0:
        raise CkaqadError(f"--max-tokens {max_tokens} is less than one sequence of {seq_len} tokens")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if rows_wanted is not None and len(stream) >= rows_wanted * body:
            break
    rows = len(stream) // body if rows_wanted is None else min(rows_wanted, len(stream) // body)
    if rows == 0:
        raise CkaqadError(f"the data hold {len(stream)} tokens, fewer than one sequence of {seq_len}")
    out = torch.tensor(stream[: rows * body], dtype=torch.long).view(rows, body)
    if bos is not None:
        out = torch.cat([torch.full((rows, 1), bos, dtype=torch.long), out], dim=1)
    return out
