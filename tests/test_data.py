"""data.py: text sources and deterministic sequence packing."""

from __future__ import annotations

import json

import pytest
import torch

from ckaqad_cli.builtin.tokenizer import build_tokenizer
from ckaqad_cli.data import load_texts, pack_sequences
from ckaqad_cli.errors import CkaqadError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_txt_paragraphs_and_jsonl_field(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond\n\n")
    assert load_texts(tmp_path / "a.txt") == ["first para\nline two", "second"]
    rows = [{"text": "x=1", "body": "b1"}, {"text": "y=2", "body": "b2"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(tmp_path / "a.jsonl") == ["x=1", "y=2"]
    assert load_texts(tmp_path / "a.jsonl", text_field="body") == ["b1", "b2"]
    with pytest.raises(CkaqadError, match=r"a.jsonl:1 has no string field 'missing'"):
        load_texts(tmp_path / "a.jsonl", text_field="missing")


def test_empty_or_missing_sources_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CkaqadError, match="holds no text"):
        load_texts(tmp_path / "empty.txt")
    with pytest.raises(CkaqadError, match="not 'builtin'"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CkaqadError, match="bad.jsonl:1 is not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl"])
def test_binary_or_unreadable_data_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'{"text": "ok"}\n\n\x8f\xff\x00 binary')
    with pytest.raises(CkaqadError, match=rf"^cannot read {path} as UTF-8 .*: byte \d+ is not UTF-8") as e:
        load_texts(path)
    assert "\n" not in str(e.value)


def test_builtin_texts_follow_split_and_seed():
    train, test = load_texts("builtin", split="train", seed=0), load_texts("builtin", split="test", seed=0)
    assert train and test and not set(train[:200]) & set(test[:200])
    assert load_texts("builtin", seed=1)[:5] != train[:5]
    with pytest.raises(CkaqadError, match="--split of the built-in data must be one of train, test, not 'validation'"):
        load_texts("builtin", split="validation")


def test_pack_sequences_layout_and_determinism(tok):
    texts = [f"text number {i}" for i in range(50)]
    packed = pack_sequences(texts, tok, 16, seed=3)
    assert packed.dtype == torch.long and packed.shape[1] == 16
    assert (packed[:, 0] == tok.bos_token_id).all()
    body = packed[:, 1:].reshape(-1).tolist()
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(body) == (len(stream) // 15) * 15  # only whole rows, nothing lost but the tail
    assert torch.equal(packed, pack_sequences(texts, tok, 16, seed=3))
    assert not torch.equal(packed, pack_sequences(texts, tok, 16, seed=4))
    # the joined texts come back in the shuffled order, separated by EOS
    decoded = tok.decode(packed[:, 1:].reshape(-1).tolist(), skip_special_tokens=False).split(tok.eos_token)
    assert all(piece in texts for piece in decoded[1:-1])
    assert len(set(decoded[1:-1])) == len(decoded) - 2  # each text once
    assert decoded[1:-1] != texts[1 : len(decoded) - 1]  # shuffled, not in file order


def test_pack_sequences_max_tokens_and_errors(tok):
    texts = [f"sample {i}" for i in range(100)]
    assert pack_sequences(texts, tok, 8, max_tokens=40).shape == (5, 8)
    assert pack_sequences(texts, tok, 8, max_tokens=47).shape == (5, 8)
    with pytest.raises(CkaqadError, match="fewer than one sequence"):
        pack_sequences(["ab"], tok, 64)
    with pytest.raises(CkaqadError, match="less than one sequence"):
        pack_sequences(texts, tok, 64, max_tokens=10)
