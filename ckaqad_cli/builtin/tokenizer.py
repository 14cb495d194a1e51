"""The built-in model's character-level tokenizer (one token per printable ASCII character, plus newline)."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = "".join(chr(code) for code in range(32, 127)) + "\n"
VOCAB_SIZE = 112  # the characters and special tokens (100), padded with reserved tokens to a multiple of 16

assert set(string.printable) - set(CHARACTERS) <= set("\t\r\x0b\x0c")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer; ``tokenizer(text)`` yields BOS followed by one id per character (unknown ones -> UNK)."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    tokens += [f"<reserved_{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    vocab = {token: index for index, token in enumerate(tokens)}
    # BPE without merges splits a text into characters; no pre-tokenizer, so spaces are ordinary characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
