"""Train the built-in reasoner, resumably: SFT on the reasoner suite, then expert iteration (RL on verifiable rewards).

    python -m ckaqad_cli.builtin.train_reasoner --phase sft --run-dir RUN --minutes 110
    python -m ckaqad_cli.builtin.train_reasoner --resume --run-dir RUN --minutes 110      # the next chunk
    python -m ckaqad_cli.builtin.train_reasoner --phase rl --init RUN/model --run-dir RL --lr 2e-4 --warmup 20

``RUN/checkpoint.pt`` holds everything a run needs to go on exactly where it stopped (float32 weights, AdamW state,
step, RNG states, the log, the RL round's accepted traces); it is written atomically every ``--checkpoint-every``
steps or ``--checkpoint-minutes``, and when ``--minutes`` or ``--chunk-steps`` ends the invocation, so a resumed run
repeats the uninterrupted one bit for bit. ``RUN/model`` is the best validation checkpoint so far in bfloat16 (an HF
directory, as ``train_teacher.save_teacher`` writes it).

SFT: the loss of ``train_teacher`` (cross-entropy of the answer and EOS) on fresh problems each step. RL, expert
iteration: each round samples ``--samples`` traces of each of ``--prompts`` training problems at ``--temperature``,
keeps those whose final answer is right (the reward), and takes ``--round-steps`` SFT steps on them.
"""

from __future__ import annotations

import argparse
import io
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ckaqad_cli.atomic import atomic_write_bytes, atomic_write_json
from ckaqad_cli.builtin.generation import decode
from ckaqad_cli.builtin.reasoner_tasks import MAX_TRACE_CHARS, evaluate, generate, is_correct
from ckaqad_cli.builtin.tasks import Problem
from ckaqad_cli.builtin.tokenizer import build_tokenizer
from ckaqad_cli.builtin.train_teacher import encode_batch, learning_rate, model_config, save_teacher
from ckaqad_cli.progress import make_progress

CHECKPOINT, MODEL = "checkpoint.pt", "model"
VALIDATION_SEED = 10_000  # checkpoint selection draws from the held-out split with this seed
REPORT_SEED = 0  # the final accuracy uses the held-out split with this seed
SAMPLE_PROBLEMS = 24  # the shipped model's fingerprint: its replies to the report draw's first problems
POSITIONS = 512  # the longest problem (prompt, trace, BOS, EOS) is under 300 tokens
RUNTIME = ("run_dir", "resume", "minutes", "chunk_steps", "checkpoint_every", "checkpoint_minutes", "threads")
"""Options of one invocation; every other option is the run's and is taken from the checkpoint on --resume."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--run-dir", type=Path, required=True, help="checkpoint.pt, the best model and the log go here")
    add("--resume", action="store_true", help="continue the run in --run-dir (its own options; runtime ones anew)")
    add("--phase", choices=("sft", "rl"), default="sft", help="sft (from scratch or --init) or rl (needs --init)")
    add("--init", type=Path, default=None, help="start from this HF model directory (weights up-cast to float32)")
    add("--steps", type=int, default=6000, help="SFT optimizer steps of the schedule (default 6000)")
    add("--rounds", type=int, default=40, help="RL rounds (default 40)")
    add("--prompts", type=int, default=64, help="RL training problems sampled per round (default 64)")
    add("--samples", type=int, default=4, help="RL traces sampled per problem (default 4)")
    add("--temperature", type=float, default=1.0, help="RL sampling temperature (default 1.0)")
    add("--round-steps", type=int, default=8, help="RL optimizer steps per round (default 8)")
    add("--batch-size", type=int, default=32, help="problems per optimizer step (default 32)")
    add("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3, for SFT)")
    add("--warmup", type=int, default=200, help="linear warmup steps (default 200)")
    add("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices (default 0.01)")
    add("--seed", type=int, default=0, help="seed of the weights, data and sampling (default 0)")
    add("--layers", type=int, default=6, help="decoder layers (default 6)")
    add("--hidden", type=int, default=128, help="hidden width (default 128)")
    add("--heads", type=int, default=4, help="attention heads (default 4)")
    add("--mlp", type=int, default=512, help="MLP width (default 512)")
    add("--families", default=None, help="comma-separated training mix, drawn in turn (default: each family once)")
    add("--eval-every", type=int, default=500, help="SFT steps between validations (RL: every round)")
    add("--eval-size", type=int, default=256, help="validation problems (default 256)")
    add("--report-size", type=int, default=1000, help="held-out problems scored at the end (default 1000)")
    add("--minutes", type=float, default=None, help="end this invocation (checkpointed) after this wall time")
    add("--chunk-steps", type=int, default=None, help="end this invocation (checkpointed) after this many steps")
    add("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    add("--checkpoint-minutes", type=float, default=15.0, help="minutes between checkpoints (default 15)")
    add("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.phase == "rl" and args.init is None and not args.resume:
        parser.error("--phase rl needs --init (the SFT model directory)")
    args.families = args.families.split(",") if isinstance(args.families, str) else args.families
    if args.families:
        generate("train", 1, 0, args.families)  # an unknown family fails here
    return args


def _command() -> str:
    return shlex.join(["python", "-m", "ckaqad_cli.builtin.train_reasoner", *sys.argv[1:]])


def save_checkpoint(run_dir: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / CHECKPOINT, buffer.getvalue())


def sft_loss_step(model, optimizer, tokenizer, problems: list[Problem], lr: float) -> float:
    """One AdamW step on the answer cross-entropy of ``problems``, equal to one batch's mean over answer tokens.

    The batch is run one family at a time (their lengths differ by 100+ tokens, so a mixed batch is mostly padding),
    each part's mean loss weighted by its share of the answer tokens."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    parts = [encode_batch([p for p in problems if p.family == f], tokenizer)
             for f in dict.fromkeys(p.family for p in problems)]
    tokens = [int((part["labels"] != -100).sum()) for part in parts]
    total = 0.0
    for part, count in zip(parts, tokens):
        loss = model(**part).loss * (count / sum(tokens))
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return total


def sample_round(model, tokenizer, args: argparse.Namespace, index: int) -> dict:
    """Expert iteration's data for round ``index``: sampled traces whose final answer is right (deduplicated)."""
    problems = generate("train", args.prompts, args.seed * 1_000_003 + 10_000_000 + index, args.families)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
    prompts = [p.prompt for p in problems for _ in range(args.samples)]
    replies = decode(model, tokenizer, prompts, max_new_tokens=MAX_TRACE_CHARS, temperature=args.temperature,
                     generator=generator, progress=True)
    accepted, rewards = {}, {}
    for i, reply in enumerate(replies):
        problem = problems[i // args.samples]
        correct = is_correct(reply, problem)
        rewards.setdefault(problem.family, []).append(correct)
        if correct:
            accepted[(problem.prompt, reply)] = (problem.family, problem.prompt, reply)
    return {"index": index, "accepted": list(accepted.values()),
            "reward": {f: sum(r) / len(r) for f, r in rewards.items()}}


def round_batch(round_: dict, seed: int, step_in_round: int, batch_size: int) -> list[Problem]:
    """The ``step_in_round``-th batch of a round's accepted traces, in a seeded shuffled order, cycling."""
    pool = [Problem(*item) for item in round_["accepted"]]
    random.Random(f"ckaqad-reasoner-rl:{seed}:{round_['index']}").shuffle(pool)
    start = step_in_round * batch_size
    return [pool[(start + i) % len(pool)] for i in range(min(batch_size, len(pool)))]


def new_state(args: argparse.Namespace, tokenizer) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(model_config(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                              mlp=args.mlp, positions=POSITIONS))
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in RUNTIME}
    log = {"command": _command(),
           "config": config, "parameters": sum(p.numel() for p in model.parameters()), "history": [],
           "train_seconds": 0.0}
    return {"config": config, "step": 0, "model": None, "optimizer": None, "log": log, "best": -1.0,
            "round": None, "window": [0.0, 0], "done": False}, model


def make_optimizer(model, args) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))


def validate(model, tokenizer, args, state: dict, validation: list[Problem], lr: float, elapsed: float) -> None:
    """Score the validation draw, log it, and write the model to RUN/model when it is the best so far."""
    accuracy = evaluate(model, tokenizer, validation, progress=True)
    loss_sum, steps = state["window"]
    record = {"step": state["step"], "phase": args.phase, "loss": loss_sum / steps if steps else None, "lr": lr,
              "val_accuracy": accuracy["overall"], "per_family": accuracy["per_family"],
              "elapsed_s": round(elapsed, 1)}
    if state["round"] is not None:
        record["reward"] = state["round"]["reward"]
    state["log"]["history"].append(record)
    state["window"] = [0.0, 0]
    print(f"step {state['step']} loss {record['loss'] or 0:.4f} lr {lr:.2e} val {accuracy['overall']:.3f} "
          + " ".join(f"{k}={v:.2f}" for k, v in accuracy["per_family"].items()), flush=True)
    if accuracy["overall"] >= state["best"]:
        state["best"] = accuracy["overall"]
        state["log"].update(best_step=state["step"], best_val_accuracy=accuracy["overall"])
        save_teacher(model, tokenizer, args.run_dir / MODEL, state["log"], max_new_tokens=MAX_TRACE_CHARS)


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) one phase until it ends or this invocation's budget does; return the log."""
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    path = args.run_dir / CHECKPOINT
    if args.resume:
        state = torch.load(path, weights_only=True)
        for key, value in state["config"].items():
            setattr(args, key, value)
        args.init = None  # the weights come from the checkpoint
        state["log"].setdefault("resumed", []).append({"command": _command(), "step": state["step"]})
        model = LlamaForCausalLM(model_config(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                              mlp=args.mlp, positions=POSITIONS))
        model.load_state_dict(state["model"])
        optimizer = make_optimizer(model, args)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
    else:
        if path.exists():
            raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --run-dir")
        state, model = new_state(args, tokenizer)
        args.hidden, args.layers = model.config.hidden_size, model.config.num_hidden_layers
        args.heads, args.mlp = model.config.num_attention_heads, model.config.intermediate_size
        state["config"].update(hidden=args.hidden, layers=args.layers, heads=args.heads, mlp=args.mlp)
        optimizer = make_optimizer(model, args)
    validation = generate("test", args.eval_size, VALIDATION_SEED)
    total = args.steps if args.phase == "sft" else args.rounds * args.round_steps
    done_here, last_save = 0, time.monotonic()
    base_seconds = state["log"]["train_seconds"]

    def checkpoint() -> None:
        state["log"]["train_seconds"] = round(base_seconds + time.monotonic() - started, 1)
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     rng={"torch": torch.get_rng_state(), "python": random.getstate()})
        save_checkpoint(args.run_dir, state)

    if args.phase == "rl" and state["step"] == 0 and not state["log"]["history"]:
        validate(model, tokenizer, args, state, validation, 0.0, 0.0)  # the accuracy before RL
    progress = make_progress(Console(stderr=True), label=f"reasoner {args.phase}", fields=("status",))
    with progress:
        bar = progress.add_task("train", total=total, completed=state["step"], status="")
        while state["step"] < total:
            step = state["step"]
            lr = learning_rate(step, peak=args.lr, warmup=args.warmup, total=total)
            if args.phase == "sft":
                problems = generate("train", args.batch_size, args.seed * 1_000_003 + step + 1, args.families)
            else:
                index, within = divmod(step, args.round_steps)
                if state["round"] is None or state["round"]["index"] != index:
                    state["round"] = sample_round(model, tokenizer, args, index)
                problems = round_batch(state["round"], args.seed, within, args.batch_size)
            loss = sft_loss_step(model, optimizer, tokenizer, problems, lr) if problems else 0.0
            state["step"], done_here = step + 1, done_here + 1
            state["window"] = [state["window"][0] + loss, state["window"][1] + 1]
            progress.update(bar, advance=1, status=f"loss {loss:.3f}")
            end_of_eval = (state["step"] % args.eval_every == 0 if args.phase == "sft"
                           else state["step"] % args.round_steps == 0)
            if end_of_eval or state["step"] == total:
                validate(model, tokenizer, args, state, validation, lr,
                         base_seconds + time.monotonic() - started)
            budget_over = ((args.minutes is not None and time.monotonic() - started > 60 * args.minutes)
                           or (args.chunk_steps is not None and done_here >= args.chunk_steps))
            if (state["step"] % args.checkpoint_every == 0 or budget_over or state["step"] == total
                    or time.monotonic() - last_save > 60 * args.checkpoint_minutes):
                state["done"] = state["step"] == total
                checkpoint()
                last_save = time.monotonic()
            if budget_over:
                break
    if state["step"] == total and "sample_correct" not in state["log"].get("final_accuracy", {}):
        report(args, state)
        checkpoint()
    return state["log"]


def sample_correct(model, tokenizer) -> list[int]:
    """1/0 per problem of the first SAMPLE_PROBLEMS of the report draw, greedy, in one batch."""
    problems = generate("test", SAMPLE_PROBLEMS, REPORT_SEED)
    replies = decode(model, tokenizer, [p.prompt for p in problems], max_new_tokens=MAX_TRACE_CHARS)
    return [int(is_correct(reply, problem)) for reply, problem in zip(replies, problems)]


def report(args: argparse.Namespace, state: dict) -> None:
    """Score the shipped form (the best model, in bfloat16) on the report draw of the held-out split, and record its
    replies' correctness on the first SAMPLE_PROBLEMS (what tests/test_builtin_reasoner.py reproduces)."""
    out = args.run_dir / MODEL
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tokenizer = build_tokenizer()
    final = evaluate(shipped, tokenizer, generate("test", args.report_size, REPORT_SEED), progress=True)
    state["log"]["final_accuracy"] = {**final, "dtype": "bfloat16", "split": "test", "seed": REPORT_SEED,
                                      "sample_correct": sample_correct(shipped, tokenizer)}
    atomic_write_json(out / "training_log.json", state["log"]).chmod(0o644)
    print(f"held-out accuracy (bf16, {final['n']} problems): {final['overall']:.4f} "
          + " ".join(f"{k}={v:.3f}" for k, v in final["per_family"].items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    log = train(args)
    print(f"best validation {log.get('best_val_accuracy')} at step {log.get('best_step')} -> {args.run_dir / MODEL}",
          flush=True)


if __name__ == "__main__":
    main()
