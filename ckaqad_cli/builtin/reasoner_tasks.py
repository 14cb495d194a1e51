"""The reasoner's task suite: problems whose answers are worked traces (60+ characters on average) ending in a final
answer, and its scorer, exact match of that final answer.

An answer reads ``<trace>#<final>``: the trace writes every intermediate result, each step reading only what is a few
characters back (as a reasoning model's chain of thought does), and ``#`` appears nowhere else. The split rule and
the draw are those of ``tasks.py`` (:func:`tasks.draw`), under their own seed namespace.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ckaqad_cli.builtin.generation import decode
from ckaqad_cli.builtin.tasks import Problem, draw

FINAL = "#"  # separates the trace from the final answer
MAX_TRACE_CHARS = 200  # no answer is longer (a test checks it); decoding stops after this many tokens
_VARIABLES = "abc"
_LETTERS = "abcdefgh"


def _multiply_digit(a: int, digit: int) -> str:
    """``347*8:7*8=56,4*8+5=37,3*8+3=27=2776``: a times one digit, the school way, least significant digit first."""
    steps, carry = [], 0
    for char in reversed(str(a)):
        product = int(char) * digit + carry
        steps.append(f"{char}*{digit}={product}" if carry == 0 else f"{char}*{digit}+{carry}={product}")
        carry = product // 10
    return f"{a}*{digit}:" + ",".join(steps) + f"={a * digit}"


def _multiplication(rng: random.Random) -> tuple[str, str]:
    """``47*38=`` -> ``47*8:7*8=56,4*8+5=37=376|47*3:7*3=21,4*3+2=14=141|376+1410=1786#1786``.

    A 2-3 digit number times a 2 digit one: the partial product of each digit of the multiplier (units first), then
    their sum with the tens partial shifted by one place."""
    a, b = rng.randint(10, 999), rng.randint(10, 99)
    units, tens = b % 10, b // 10
    low, high = a * units, a * tens * 10
    trace = [_multiply_digit(a, units), _multiply_digit(a, tens), f"{low}+{high}={low + high}"]
    return f"{a}*{b}=", "|".join(trace) + f"{FINAL}{a * b}"


def _program_trace(rng: random.Random) -> tuple[str, str]:
    """``a=3;b=a+4;a=b-1;...;print(a)=`` -> ``a=3|b=3+4=7|a=7-1=6|...#6``: 10-14 assignments over a, b, c.

    The first assignment is a digit; each later one adds a digit to, subtracts a digit from, or adds up assigned
    variables. The trace writes each assignment with its operands' current values substituted, then its value."""
    first = rng.choice(_VARIABLES)
    values = {first: rng.randint(0, 9)}
    lines, trace = [f"{first}={values[first]}"], [f"{first}={values[first]}"]
    for _ in range(rng.randint(9, 13)):
        target, source = rng.choice(_VARIABLES), rng.choice(sorted(values))
        kind = rng.choice(("+", "-", "var") if len(values) > 1 else ("+", "-"))
        if kind == "var":
            other = rng.choice(sorted(values))
            value = values[source] + values[other]
            lines.append(f"{target}={source}+{other}")
            trace.append(f"{target}={values[source]}+{values[other]}={value}")
        else:
            constant = rng.randint(1, 9)
            value = values[source] + constant if kind == "+" else values[source] - constant
            lines.append(f"{target}={source}{kind}{constant}")
            trace.append(f"{target}={values[source]}{kind}{constant}={value}")
        values[target] = value
    shown = rng.choice(sorted(values))
    return ";".join(lines) + f";print({shown})=", "|".join(trace) + f"{FINAL}{values[shown]}"


_LIST_STEPS = {
    "l=sorted(l)": sorted,
    "l=l[::-1]": lambda items: items[::-1],
    "l=l[1:]": lambda items: items[1:],
    "l=l[:-1]": lambda items: items[:-1],
    "l=[x+1 for x in l]": lambda items: [x + 1 for x in items],
    "l=[x*2 for x in l]": lambda items: [x * 2 for x in items],
    "l=[x%5 for x in l]": lambda items: [x % 5 for x in items],
}
_SHORTENING = ("l=l[1:]", "l=l[:-1]")
_LIST_RESULTS = {"sum(l)": sum, "max(l)": max, "min(l)": min, "len(l)": len}


def _show(items: Sequence[int]) -> str:
    return "[" + ",".join(map(str, items)) + "]"


def _list_pipeline(rng: random.Random) -> tuple[str, str]:
    """``l=[3,8,1,5,2];l=sorted(l);l=l[1:];...;print(sum(l))=`` -> ``[1,2,3,5,8]|[2,3,5,8]|...#18``.

    5-7 digits through 4-5 list steps (none empties the list); the trace is the list after each step."""
    items = [rng.randint(0, 9) for _ in range(rng.randint(5, 7))]
    lines, trace = [f"l={_show(items)}"], []
    for _ in range(rng.randint(4, 5)):
        name = rng.choice([s for s in _LIST_STEPS if len(items) > 2 or s not in _SHORTENING])
        items = _LIST_STEPS[name](items)
        lines.append(name)
        trace.append(_show(items))
    result = rng.choice(sorted(_LIST_RESULTS))
    return ";".join(lines) + f";print({result})=", "|".join(trace) + f"{FINAL}{_LIST_RESULTS[result](items)}"


def _string_pipeline(rng: random.Random) -> tuple[str, str]:
    """``s='cabde';s=s[::-1];s=s.replace('a','h');...;print(s)=`` -> ``edbac|edbhc|...#...``.

    6-9 letters through 6-8 string steps; the trace is the string after each step; the final answer is the string,
    its length, or a letter count."""
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(6, 9)))
    lines, trace = [f"s='{word}'"], []
    for _ in range(rng.randint(6, 8)):
        kind = rng.choice(("reverse", "replace", "rotate", "upper", "lower", "drop"))
        if kind == "reverse":
            lines.append("s=s[::-1]")
            word = word[::-1]
        elif kind == "replace":
            old, new = rng.choice(word), rng.choice(_LETTERS + _LETTERS.upper())
            lines.append(f"s=s.replace('{old}','{new}')")
            word = word.replace(old, new)
        elif kind == "rotate":
            lines.append("s=s[1:]+s[0]")
            word = word[1:] + word[0]
        elif kind == "upper":
            lines.append("s=s.upper()")
            word = word.upper()
        elif kind == "lower":
            lines.append("s=s.lower()")
            word = word.lower()
        else:  # drop the last letter, keeping at least 3
            if len(word) <= 3:
                continue
            lines.append("s=s[:-1]")
            word = word[:-1]
        trace.append(word)
    result = rng.choice(("s", "len(s)", "count"))
    if result == "count":
        letter = rng.choice(word)
        result, final = f"s.count('{letter}')", str(word.count(letter))
    else:
        final = word if result == "s" else str(len(word))
    return ";".join(lines) + f";print({result})=", "|".join(trace) + f"{FINAL}{final}"


FAMILIES = {
    "multiplication": _multiplication,
    "program_trace": _program_trace,
    "list_pipeline": _list_pipeline,
    "string_pipeline": _string_pipeline,
}


def generate(split: str, n: int, seed: int, families: Sequence[str] | None = None) -> list[Problem]:
    """``n`` problems of ``split``, the families in turn; the same (split, n, seed) always gives the same list."""
    return draw(FAMILIES, "ckaqad-reasoner", split, n, seed, families)


def final_answer(reply: str) -> str | None:
    """The final answer of a reply (the text after its last ``#``), or None when it has none."""
    return reply.rsplit(FINAL, 1)[1] if FINAL in reply else None


def is_correct(reply: str | None, problem: Problem) -> bool:
    """Exact match of the final answer only: a right value after a wrong trace counts, a reply that never ended
    (None, no EOS within the budget) does not."""
    return reply is not None and final_answer(reply) == final_answer(problem.answer)


def evaluate(model, tokenizer, problems: Sequence[Problem], batch_size: int = 64, progress: bool = False) -> dict:
    """Greedy, KV-cached, batched decoding of whole traces, scored by :func:`is_correct`:
    ``{"overall": acc, "per_family": {family: acc}, "n": count}``."""
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    replies = decode(model, tokenizer, [p.prompt for p in problems], max_new_tokens=MAX_TRACE_CHARS,
                     batch_size=batch_size, progress=progress)
    hits: dict[str, list[bool]] = {}
    for problem, reply in zip(problems, replies):
        hits.setdefault(problem.family, []).append(is_correct(reply, problem))
    return {"overall": sum(map(sum, hits.values())) / len(problems),
            "per_family": {family: sum(h) / len(h) for family, h in hits.items()}, "n": len(problems)}
