"""The built-in task suite: procedurally generated reasoning-and-code problems, and an exact-match scorer.

Every problem is a short code-like prompt ending in ``=`` whose answer is a short string (a number, a list, a word,
``True``/``False``). The split of a problem is a function of its prompt text alone (a SHA-256 hash), so the train and
test splits never share a prompt, whatever seeds are used to draw from them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SPLITS = ("train", "test")
TEST_BUCKETS = 8  # one prompt hash bucket in TEST_BUCKETS is held out
MAX_ANSWER_CHARS = 40  # no answer is longer (the longest: a program trace); greedy decoding stops after this many tokens
_LETTERS = "abcdefgh"  # a small alphabet, so that count() has answers other than 0 and 1
_VARIABLES = "xyz"
_BRACKETS = {"(": ")", "[": "]"}


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training text: the prompt followed by its answer."""
        return self.prompt + self.answer


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from the hash of its text (the same on every machine and Python)."""
    bucket = hashlib.sha256(prompt.encode("utf-8")).digest()[0] % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def _signed_terms(rng: random.Random, count: int) -> tuple[str, int]:
    text, total = "", 0
    for _ in range(count):
        value = rng.randint(0, 9)
        if rng.random() < 0.5:
            text, total = text + f"+{value}", total + value
        else:
            text, total = text + f"-{value}", total - value
    return text, total


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """Two-step integer arithmetic: ``47+8-3=`` or ``7*8-5=`` (left to right, the usual precedence)."""
    if rng.random() < 0.5:
        first = rng.randint(10, 99)
        terms, total = _signed_terms(rng, 2)
        return f"{first}{terms}=", str(first + total)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    terms, total = _signed_terms(rng, 1)
    return f"{a}*{b}{terms}=", str(a * b + total)


def _program_trace(rng: random.Random) -> tuple[str, str]:
    """Trace three assignments, then print one variable: ``x=4;y=x+3;x=y-5;print(x)=`` -> ``x=4|x=4,y=7|x=2,y=7|2``.

    The answer is worked: after each assignment, the state of every variable assigned so far (in the order x, y, z),
    then the printed value. Each step reads only the state just before it, as a reasoning model writes its trace.
    """
    first = rng.choice(_VARIABLES)
    values = {first: rng.randint(0, 9)}
    lines = [f"{first}={values[first]}"]
    states = [_state(values)]
    for _ in range(2):
        source = rng.choice(sorted(values))
        target = rng.choice(_VARIABLES)
        constant = rng.randint(1, 9)
        if rng.random() < 0.5:
            values[target] = values[source] + constant
            lines.append(f"{target}={source}+{constant}")
        else:
            values[target] = values[source] - constant
            lines.append(f"{target}={source}-{constant}")
        states.append(_state(values))
    shown = rng.choice(sorted(values))
    return ";".join(lines) + f";print({shown})=", "|".join(states + [str(values[shown])])


def _state(values: dict[str, int]) -> str:
    """``x=4,y=7``: every assigned variable and its value, in the order x, y, z."""
    return ",".join(f"{name}={values[name]}" for name in sorted(values))


def _list_operation(rng: random.Random) -> tuple[str, str]:
    """One list builtin on 3-5 digits: ``sorted([3,8,1])=`` -> ``[1,3,8]``."""
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    literal = "[" + ",".join(map(str, items)) + "]"

    def show(values: Sequence[int]) -> str:
        return "[" + ",".join(map(str, values)) + "]"

    operation = rng.choice(("max", "min", "sum", "sorted", "reversed"))
    if operation == "max":
        return f"max({literal})=", str(max(items))
    if operation == "min":
        return f"min({literal})=", str(min(items))
    if operation == "sum":
        return f"sum({literal})=", str(sum(items))
    if operation == "sorted":
        return f"sorted({literal})=", show(sorted(items))
    return f"{literal}[::-1]=", show(items[::-1])


def _string_operation(rng: random.Random) -> tuple[str, str]:
    """One string method on 3-6 letters: ``'abca'.count('a')=`` -> ``2``."""
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    operation = rng.choice(("reverse", "upper", "count", "len", "index"))
    if operation == "reverse":
        return f"'{word}'[::-1]=", word[::-1]
    if operation == "upper":
        return f"'{word}'.upper()=", word.upper()
    if operation == "count":
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(_LETTERS)
        return f"'{word}'.count('{letter}')=", str(word.count(letter))
    if operation == "len":
        return f"len('{word}')=", str(len(word))
    position = rng.randrange(len(word))
    return f"'{word}'[{position}]=", word[position]


def _balanced_brackets(rng: random.Random, pairs: int) -> str:
    out, stack = [], []
    opened = 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.5):
            bracket = rng.choice(tuple(_BRACKETS))
            stack.append(bracket)
            out.append(bracket)
            opened += 1
        else:
            out.append(_BRACKETS[stack.pop()])
    return "".join(out)


def is_balanced(text: str) -> bool:
    closing = {close: open_ for open_, close in _BRACKETS.items()}
    stack: list[str] = []
    for char in text:
        if char in _BRACKETS:
            stack.append(char)
        elif not stack or stack.pop() != closing[char]:
            return False
    return not stack


def _bracket_matching(rng: random.Random) -> tuple[str, str]:
    """Whether 4-10 brackets of two kinds are balanced; the unbalanced half differ from a balanced string by one
    edit (a swap of neighbours, or one bracket of the wrong kind or direction), so counting alone does not answer."""
    text = _balanced_brackets(rng, rng.randint(2, 5))
    if rng.random() < 0.5:
        chars = list(text)
        i = rng.randrange(len(chars))
        if rng.random() < 0.5 and i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:
            chars[i] = rng.choice([c for c in "()[]" if c != chars[i]])
        text = "".join(chars)
    return f"balanced('{text}')=", str(is_balanced(text))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "program_trace": _program_trace,
    "list_ops": _list_operation,
    "string_ops": _string_operation,
    "brackets": _bracket_matching,
}


def generate(split: str, n: int, seed: int, families: Sequence[str] | None = None) -> list[Problem]:
    """``n`` problems of ``split``, the families in turn; the same (split, n, seed) always gives the same list."""
    return draw(FAMILIES, "ckaqad-builtin", split, n, seed, families)


def draw(table: dict[str, Callable[[random.Random], tuple[str, str]]], suite: str, split: str, n: int, seed: int,
         families: Sequence[str] | None = None) -> list[Problem]:
    """``n`` problems of ``split`` from the generators of ``table``, the families in turn, from a ``random.Random``
    seeded by ``(suite, split, seed)``; prompts of the other split are rejected, so a longer draw extends a shorter one
    and the splits never share a prompt."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = list(families) if families is not None else list(table)
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        raise ValueError(f"unknown task families {unknown}; known: {sorted(table)}")
    rng = random.Random(f"{suite}:{split}:{seed}")
    problems = []
    for i in range(n):
        family = names[i % len(names)]
        while True:
            prompt, answer = table[family](rng)
            if split_of(prompt) == split:
                break
        problems.append(Problem(family, prompt, answer))
    return problems


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_ANSWER_CHARS) -> list[str]:
    """Greedy continuations of ``prompts`` up to EOS, batched with left padding.

    Each step re-runs the whole sequence without a KV cache (the sequences are short), so any module that maps
    ``model(input_ids=..., attention_mask=..., position_ids=...)`` to ``.logits`` works, fake-quantized ones included.
    """
    from ckaqad_cli.builtin.generation import left_padded  # imports transformers: only when decoding

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    ids, mask = left_padded(tokenizer, prompts, device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1, :].argmax(-1)
        token = torch.where(finished, torch.full_like(token, eos), token)
        generated.append(token)
        finished |= token == eos
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(finished.all()):
            break
    answers = []
    for row in torch.stack(generated, dim=1).tolist():
        if eos in row:
            row = row[: row.index(eos)]
        else:  # no EOS within the budget: mark it, so it never matches a (shorter) answer
            row = row + [eos]
        answers.append(tokenizer.decode(row, skip_special_tokens=False))
    return answers


def evaluate(model, tokenizer, problems: Sequence[Problem], batch_size: int = 64) -> dict:
    """Exact-match accuracy of greedy answers: ``{"overall": acc, "per_family": {family: acc}, "n": count}``."""
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    was_training = model.training
    model.eval()
    try:
        correct: dict[str, list[bool]] = {}
        # one family per batch: decoding runs until the longest answer of the batch ends, and the lengths differ
        for family in dict.fromkeys(p.family for p in problems):
            of_family = [p for p in problems if p.family == family]
            for start in range(0, len(of_family), batch_size):
                batch = of_family[start : start + batch_size]
                answers = greedy_answers(model, tokenizer, [p.prompt for p in batch])
                correct.setdefault(family, []).extend(a == p.answer for p, a in zip(batch, answers))
    finally:
        model.train(was_training)
    per_family = {family: sum(hits) / len(hits) for family, hits in correct.items()}
    overall = sum(sum(hits) for hits in correct.values()) / len(problems)
    return {"overall": overall, "per_family": per_family, "n": len(problems)}
