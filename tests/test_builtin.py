"""The built-in task suite (generator, splits, scorer), its tokenizer, training inputs, and the shipped teacher."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckaqad_cli.builtin import TEACHER_DIR, suite
from ckaqad_cli.builtin.tasks import (
    FAMILIES,
    MAX_ANSWER_CHARS,
    Problem,
    evaluate,
    generate,
    greedy_answers,
    split_of,
)
from ckaqad_cli.builtin.tokenizer import CHARACTERS, SPECIAL_TOKENS, VOCAB_SIZE, build_tokenizer
from ckaqad_cli.builtin.train_teacher import encode_batch, learning_rate
from ckaqad_cli.data import load_texts
from ckaqad_cli.settings import BUILTIN, BUILTIN_TEACHERS, builtin_data

TEACHER_FLOOR = 0.75  # the shipped teacher scores 0.903 on 1000 held-out problems; random weights score 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---- generator and splits -------------------------------------------------------------------------------------


def test_generate_is_deterministic_and_seeded():
    assert generate("train", 200, 3) == generate("train", 200, 3)
    assert generate("test", 200, 3) == generate("test", 200, 3)
    assert generate("train", 200, 3) != generate("train", 200, 4)
    # a longer draw extends a shorter one
    assert generate("test", 300, 3)[:200] == generate("test", 200, 3)


def test_families_take_turns():
    problems = generate("train", 50, 0)
    names = list(FAMILIES)
    assert [p.family for p in problems] == [names[i % len(names)] for i in range(50)]


def test_splits_never_share_a_prompt():
    train = {p.prompt for seed in range(3) for p in generate("train", 3000, seed)}
    test = {p.prompt for seed in range(3) for p in generate("test", 3000, seed)}
    assert train.isdisjoint(test)
    # both splits cover every family with many distinct prompts (not a handful repeated)
    for family in FAMILIES:
        assert len({p.prompt for p in generate("test", 2000, 0) if p.family == family}) > 150


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), split=st.sampled_from(["train", "test"]))
def test_every_problem_is_in_its_split_by_prompt_hash(seed, split):
    assert all(split_of(p.prompt) == split for p in generate(split, 40, seed))


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate("validation", 1, 0)
    with pytest.raises(ValueError, match="unknown task families"):
        generate("train", 1, 0, families=["chess"])


def _python_answer(problem: Problem) -> str:
    """What Python itself says: the prompts are Python expressions (or a program ending in print(var))."""
    code = problem.prompt[:-1]  # drop the trailing "="
    if problem.family == "brackets":  # independent check: strip matched pairs until none are left
        text = re.fullmatch(r"balanced\('([\[\]()]*)'\)", code).group(1)
        while "()" in text or "[]" in text:
            text = text.replace("()", "").replace("[]", "")
        return str(text == "")
    if problem.family == "program_trace":  # the state after each statement, then the printed value
        *statements, shown = code.split(";")
        scope: dict = {}
        trace = []
        for statement in statements:
            exec(statement, {"__builtins__": {}}, scope)  # noqa: S102 - our own generated assignments
            trace.append(",".join(f"{name}={scope[name]}" for name in sorted(scope)))
        return "|".join(trace + [str(scope[re.fullmatch(r"print\((\w)\)", shown).group(1)])])
    builtins = {"max": max, "min": min, "sum": sum, "sorted": sorted, "len": len}
    value = eval(code, {"__builtins__": builtins})  # noqa: S307 - our own generated expressions
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_answers_are_what_python_computes(seed):
    for problem in generate("train", 100, seed) + generate("test", 100, seed):
        assert problem.answer == _python_answer(problem), problem


def test_answers_are_short_and_tokenizable():
    problems = generate("train", 2000, 0)
    assert max(len(p.answer) for p in problems) <= MAX_ANSWER_CHARS
    assert set("".join(p.text for p in problems)) <= set(CHARACTERS)
    brackets = [p.answer for p in problems if p.family == "brackets"]
    assert 0.3 < brackets.count("True") / len(brackets) < 0.7


@pytest.mark.parametrize("name", BUILTIN_TEACHERS)
def test_builtin_data_are_the_suites_prompt_plus_answer(name):
    texts = load_texts(name, split="train", seed=5)
    assert texts == [p.prompt + p.answer for p in suite(name).generate("train", len(texts), 5)]
    assert builtin_data(BUILTIN, name) == name  # --data builtin follows the built-in teacher


# ---- tokenizer ----------------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=CHARACTERS, max_size=60))
def test_tokenizer_is_one_token_per_character(tokenizer, text):
    assume(not any(special in text for special in SPECIAL_TOKENS))  # like every HF tokenizer, these parse as one
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_specials_and_reload(tokenizer, tmp_path):
    assert len(tokenizer) == VOCAB_SIZE
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    assert tokenizer("é")["input_ids"] == [tokenizer.bos_token_id, tokenizer.unk_token_id]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "x=4;y=x+3;print(y)= 'ab'\n"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id and reloaded.pad_token_id == tokenizer.pad_token_id


# ---- training inputs ----------------------------------------------------------------------------------------------


def test_encode_batch_labels_only_the_answer_unshifted(tokenizer):
    problems = [Problem("arithmetic", "12+3-1=", "14"), Problem("list_ops", "max([1,2,3])=", "3")]
    batch = encode_batch(problems, tokenizer)
    for row, problem in enumerate(problems):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n_prompt, n_total = 1 + len(problem.prompt), 1 + len(problem.prompt) + len(problem.answer) + 1
        assert tokenizer.decode(ids[:n_total]) == "<s>" + problem.text + "</s>"
        assert (labels[:n_prompt] == -100).all() and (labels[n_total:] == -100).all()
        assert torch.equal(labels[n_prompt:n_total], ids[n_prompt:n_total])  # aligned with input ids
        assert mask.sum() == n_total and (ids[n_total:] == tokenizer.pad_token_id).all()


def test_learning_rate_warms_up_then_decays_to_floor():
    peak, warmup, total = 1e-3, 10, 110
    values = [learning_rate(s, peak=peak, warmup=warmup, total=total) for s in range(total + 5)]
    assert values[0] == pytest.approx(peak / warmup) and values[warmup - 1] == pytest.approx(peak)
    assert values[warmup + 50] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1 :]))
    assert values[-1] == pytest.approx(0.1 * peak)


# ---- scorer on hand-made cases ------------------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """A fake causal LM that continues each prompt with a scripted reply (then EOS), one token per call."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # evaluate reads the device from the parameters
        self.tokenizer, self.replies = tokenizer, replies

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        tok = self.tokenizer
        logits = torch.zeros(*input_ids.shape, len(tok))
        for row in range(input_ids.shape[0]):
            real = input_ids[row][attention_mask[row].bool()].tolist()
            assert real[0] == tok.bos_token_id and position_ids[row, -1] == len(real) - 1
            text = tok.decode(real[1:])
            prompt = next(p for p in self.replies if text.startswith(p))
            written = text[len(prompt) :]
            reply = self.replies[prompt]
            if written == reply:
                next_id = tok.eos_token_id
            elif len(written) < len(reply):
                next_id = tok.convert_tokens_to_ids(reply[len(written)])
            else:  # past the end of a reply that never stops
                next_id = tok.convert_tokens_to_ids("x")
            logits[row, -1, next_id] = 1.0
        return type("Output", (), {"logits": logits})()


PROBLEMS = [
    Problem("arithmetic", "47+8-3=", "52"),
    Problem("arithmetic", "7*8-5=", "51"),
    Problem("list_ops", "sorted([3,8,1])=", "[1,3,8]"),
    Problem("list_ops", "sum([9,9,9,9,9])=", "45"),
    Problem("brackets", "balanced('([)]')=", "False"),
    Problem("string_ops", "'abcde'[::-1]=", "edcba"),
]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_scorer_perfect_model_scores_one(tokenizer, batch_size):
    model = ScriptedModel(tokenizer, {p.prompt: p.answer for p in PROBLEMS})
    result = evaluate(model, tokenizer, PROBLEMS, batch_size=batch_size)
    assert result == {"overall": 1.0, "per_family": dict.fromkeys(["arithmetic", "list_ops", "brackets",
                                                                   "string_ops"], 1.0), "n": 6}


def test_scorer_counts_near_misses_as_wrong(tokenizer):
    replies = {
        "47+8-3=": "52",  # right
        "7*8-5=": "5",  # a prefix of the answer
        "sorted([3,8,1])=": "[1,3,8]",  # right
        "sum([9,9,9,9,9])=": "450",  # the answer plus a character
        "balanced('([)]')=": "True",  # wrong
        "'abcde'[::-1]=": "edcba" + "x" * 20,  # the answer, then no EOS within the budget
    }
    model = ScriptedModel(tokenizer, replies)
    result = evaluate(model, tokenizer, PROBLEMS, batch_size=4)
    assert result["overall"] == pytest.approx(2 / 6)
    assert result["per_family"] == {"arithmetic": 0.5, "list_ops": 0.5, "brackets": 0.0, "string_ops": 0.0}
    answers = greedy_answers(model, tokenizer, [p.prompt for p in PROBLEMS])
    assert answers[:5] == ["52", "5", "[1,3,8]", "450", "True"]
    assert answers[5] != "edcba" and answers[5].startswith("edcba")


def test_scorer_restores_training_mode(tokenizer):
    model = ScriptedModel(tokenizer, {p.prompt: p.answer for p in PROBLEMS}).train()
    evaluate(model, tokenizer, PROBLEMS[:2])
    assert model.training
    with pytest.raises(ValueError):
        evaluate(model, tokenizer, [])


# ---- the shipped teacher ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher():
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.bfloat16)
    return model, AutoTokenizer.from_pretrained(TEACHER_DIR)


def test_teacher_files_shape_and_size():
    weights = TEACHER_DIR / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (TEACHER_DIR / name).is_file()
    log = json.loads((TEACHER_DIR / "training_log.json").read_text())
    assert {"command", "seed", "steps_done", "final_accuracy"} <= set(log)


def test_teacher_loads_with_auto_classes(teacher):
    model, tokenizer = teacher
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1
    assert all(m.in_features % 16 == 0 for m in linears)


def test_teacher_scores_above_floor_on_held_out_sample(teacher):
    model, tokenizer = teacher
    result = evaluate(model, tokenizer, generate("test", 64, 0))
    assert result["n"] == 64
    assert result["overall"] > TEACHER_FLOOR, result


def test_batched_decoding_matches_one_at_a_time(teacher):
    model, tokenizer = teacher
    model = copy.deepcopy(model).float()  # fp32 so that padding cannot flip a near-tie
    prompts = [p.prompt for p in generate("test", 10, 1)]
    batched = greedy_answers(model, tokenizer, prompts)
    assert batched == [greedy_answers(model, tokenizer, [prompt])[0] for prompt in prompts]
