"""Train the built-in teacher from scratch, reproducibly (seeded), on the generated task suite.

    python -m ckaqad_cli.builtin.train_teacher --out ckaqad_cli/builtin/teacher --steps 5000 --mlp 512 --seed 0

The loss is the cross-entropy of the answer tokens only (prompt positions are labelled -100; the model shifts the
labels itself). The checkpoint with the best accuracy on a validation sample of the held-out split is written to
``--out`` (in bfloat16) each time it improves, so an interrupted or time-capped run still leaves a usable model;
``training_log.json`` beside it records the command, seed, steps, time and accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from ckaqad_cli.atomic import atomic_directory, atomic_write_json
from ckaqad_cli.builtin import TEACHER_DIR
from ckaqad_cli.builtin.tasks import Problem, evaluate, generate
from ckaqad_cli.builtin.tokenizer import VOCAB_SIZE, build_tokenizer
from ckaqad_cli.progress import make_progress

VALIDATION_SEED = 10_000  # checkpoint selection draws from the held-out split with this seed
REPORT_SEED = 0  # the accuracy in training_log.json (and docs/builtin.md) uses the held-out split with this seed


def model_config(tokenizer, *, hidden: int = 128, layers: int = 4, heads: int = 4, mlp: int = 512,
                 positions: int = 256) -> LlamaConfig:
    """The teacher's shape: every Linear's input width (hidden, mlp) is a multiple of 16, as NVFP4 needs."""
    if hidden % 16 or mlp % 16 or hidden % heads:
        raise ValueError("hidden and mlp must be multiples of 16, and hidden a multiple of heads")
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_batch(problems: list[Problem], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded ``BOS prompt answer EOS`` with labels on ``answer EOS`` only (not shifted: the model shifts)."""
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=True)["input_ids"]
    answers = tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]
    rows = [(prompt, answer + [tokenizer.eos_token_id]) for prompt, answer in zip(prompts, answers)]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        end = len(prompt) + len(answer)
        input_ids[i, :end] = torch.tensor(prompt + answer)
        attention_mask[i, :end] = 1
        labels[i, len(prompt) : end] = torch.tensor(answer)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def learning_rate(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay from ``peak`` to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_teacher(model, tokenizer, out: Path, log: dict, max_new_tokens: int = 16) -> None:
    """Write the model in bfloat16 with its tokenizer, generation config and training log, atomically."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with atomic_directory(out, overwrite=True) as tmp:
        bf16.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
            max_new_tokens=max_new_tokens,
        ).save_pretrained(tmp)
        atomic_write_json(tmp / "training_log.json", log)
        tmp.chmod(0o755)  # the temporary directory and files are private; the shipped ones are not
        for path in tmp.iterdir():
            path.chmod(0o644)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TEACHER_DIR, help=f"output directory (default {TEACHER_DIR})")
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps of the schedule (default 5000)")
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this wall time (default none)")
    parser.add_argument("--batch-size", type=int, default=128, help="problems per step (default 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=150, help="linear warmup steps (default 150)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the training data (default 0)")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between validations (default 500)")
    parser.add_argument("--eval-size", type=int, default=320, help="validation problems (default 320)")
    parser.add_argument("--report-size", type=int, default=1000, help="final held-out problems (default 1000)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine more threads spin)"
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    parser.add_argument("--mlp", type=int, default=512, help="MLP width (default 512)")
    parser.add_argument(
        "--init", type=Path, default=None,
        help="continue from this teacher directory (its weights, up-cast to float32, with a fresh optimizer and "
             "schedule) instead of a random initialization; --layers/--hidden/--mlp are then taken from it",
    )
    parser.add_argument(
        "--families", default=None,
        help="comma-separated training mix of task families drawn in turn; a repeated family is drawn more often "
             "(default: every family once). Validation always uses the whole suite",
    )
    args = parser.parse_args(argv)
    args.families = args.families.split(",") if args.families else None
    if args.families:
        generate("train", 1, 0, args.families)  # an unknown family fails here, not after the model is built
    return args


def train(args: argparse.Namespace) -> dict:
    """Train, keep the best validation checkpoint in ``args.out``, and return the training log."""
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    if args.init is not None:
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        init_log = json.loads((args.init / "training_log.json").read_text())
        args.layers, args.hidden = model.config.num_hidden_layers, model.config.hidden_size
        args.mlp = model.config.intermediate_size
    else:
        model = LlamaForCausalLM(model_config(tokenizer, hidden=args.hidden, layers=args.layers, mlp=args.mlp))
        init_log = None
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    validation = generate("test", args.eval_size, VALIDATION_SEED)
    log = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "ckaqad_cli.builtin.train_teacher"]
                              + sys.argv[1:]),
        "seed": args.seed,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": [],
    }
    if init_log is not None:  # the lineage: the run this one continued, with its own lineage
        log["init"] = {key: init_log.get(key) for key in ("command", "seed", "config", "history", "steps_done",
                                                        "train_seconds", "final_accuracy", "init")}
    best_accuracy, best_step, step = -1.0, 0, 0
    console = Console(stderr=True)
    progress = make_progress(console, label="teacher", fields=("status",))  # plain lines every 30 s in a log
    window_loss, window_steps = 0.0, 0  # the mean training loss since the last validation
    with progress:
        bar = progress.add_task("train", total=args.steps, status="")
        for step in range(1, args.steps + 1):
            lr = learning_rate(step - 1, peak=args.lr, warmup=args.warmup, total=args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            problems = generate("train", args.batch_size, args.seed * 1_000_003 + step, args.families)
            batch = encode_batch(problems, tokenizer)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            window_loss, window_steps = window_loss + loss.item(), window_steps + 1
            progress.update(bar, advance=1, status=f"loss {loss.item():.3f}")
            out_of_time = args.minutes is not None and time.monotonic() - started > 60 * args.minutes
            if step % args.eval_every == 0 or step == args.steps or out_of_time:
                accuracy = evaluate(model, tokenizer, validation)
                elapsed = time.monotonic() - started
                record = {"step": step, "loss": window_loss / window_steps, "lr": lr,
                          "val_accuracy": accuracy["overall"], "per_family": accuracy["per_family"],
                          "elapsed_s": round(elapsed, 1)}
                window_loss, window_steps = 0.0, 0
                log["history"].append(record)
                print(
                    f"step {step} loss {record['loss']:.4f} lr {lr:.2e} val {accuracy['overall']:.3f} "
                    + " ".join(f"{k}={v:.2f}" for k, v in accuracy["per_family"].items())
                    + f" [{elapsed / 60:.1f} min]",
                    flush=True,
                )
                if accuracy["overall"] >= best_accuracy:
                    best_accuracy, best_step = accuracy["overall"], step
                    log.update(best_step=best_step, best_val_accuracy=best_accuracy, steps_done=step,
                               train_seconds=round(elapsed, 1))
                    save_teacher(model, tokenizer, args.out, log)
            if out_of_time:
                break
    # The shipped model is the bf16 copy on disk: measure that one on the report sample of the held-out split.
    shipped = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16)
    shipped_tokenizer = AutoTokenizer.from_pretrained(args.out)
    final = evaluate(shipped, shipped_tokenizer, generate("test", args.report_size, REPORT_SEED))
    log.update(steps_done=step, total_seconds=round(time.monotonic() - started, 1),
               final_accuracy={**final, "dtype": "bfloat16", "split": "test", "seed": REPORT_SEED})
    atomic_write_json(args.out / "training_log.json", log).chmod(0o644)
    return log


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = train(args)
    print(f"held-out accuracy (bf16): {log['final_accuracy']['overall']:.4f} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
