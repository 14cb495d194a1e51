"""``ckaqad plan`` against ModelOpt's AutoQuantize on the built-in teacher (by hand, not a test).

``compare``: the same choices (NVFP4 W4A4 or BF16 per unit), the same effective-bits budgets (every Linear weight
counted, the BF16 ``lm_head`` included, as both tools count them), the same calibration batches. ckaqad measures its
three scores once and chooses per score and budget; AutoQuantize scores once per method (``gradient`` with the
next-token cross-entropy as its loss, ``kl_div``) and re-solves per budget from its search state. Every distinct
choice is then fake-quantized by ckaqad (the same NVFP4 numerics for all) and measured on held-out text (test split):
KL(teacher || student), mean and min layer CKA, top-1, and task accuracy on ``--task-problems`` problems of each of
the ``--eval-seeds``.

AutoQuantize's NVFP4 fake quantization asserts ``amax.is_cuda`` on the CPU; ckaqad's own fake quantization is
registered as its quant backend (``register_quant_backend``) for the NVFP4 quantizers, so the search runs on the CPU
(docs/plan.md, "AutoQuantize on the CPU").

``cost``: the sensitivity of every unit of a Qwen3-0.6B-shaped model (random weights, ``--layers`` decoder layers
instead of 28) against one diagnose pass (the teacher and one PTQ student, CKA at every layer, KL), the same
tokens, in seconds and in whole-model forwards.

``distill``: CKA-QAD from uniform NVFP4, from AutoQuantize's choice and from ckaqad's at one budget, the same steps,
then task accuracy and KL of each student.

    python benchmarks/bench_plan.py compare --json /tmp/plan_compare.json
    python benchmarks/bench_plan.py cost --layers 2 4 --cost-tokens 512 --json /tmp/plan_cost.json
    python benchmarks/bench_plan.py distill --budget 5.0 --steps 150 --json /tmp/plan_distill.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from ckaqad_cli.builtin import tasks
from ckaqad_cli.data import load_texts, pack_sequences
from ckaqad_cli.models import load_model
from ckaqad_cli.planning import sensitivity
from ckaqad_cli.planning.budget import choose
from ckaqad_cli.planning.evaluate import compare, task_accuracy
from ckaqad_cli.planning.recipe import kept_exclude
from ckaqad_cli.planning.switch import prepare
from ckaqad_cli.planning.units import UnitTable
from ckaqad_cli.settings.plan import SCORES

BUDGETS = (4.75, 5.0, 5.5, 6.0)
BACKEND = "ckaqad_nvfp4"
QUIET = Console(stderr=True, quiet=True)


def sequences(split: str, tokens: int, tokenizer) -> torch.Tensor:
    return pack_sequences(load_texts("builtin", split=split, seed=0), tokenizer, 128, max_tokens=tokens, seed=0)


# -- AutoQuantize ------------------------------------------------------------------------------------------------
def _nvfp4_backend(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """ckaqad's NVFP4 fake quantization (per-tensor global scale from the tensor's amax, blocks of 16, E4M3 scales)
    standing in for ModelOpt's CUDA-only dynamic block quantization."""
    from ckaqad_kernels.fake_quant import fake_quantize_ste
    from ckaqad_kernels.nvfp4_ref import global_scale_from_amax, tensor_amax

    return fake_quantize_ste(inputs, global_scale_from_amax(tensor_amax(inputs)))


def nvfp4_config() -> dict:
    """ModelOpt's NVFP4 W4A4 preset with its NVFP4 quantizers sent to the registered CPU backend."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import register_quant_backend

    register_quant_backend(BACKEND, _nvfp4_backend)
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("cfg", {}).get("num_bits") == (2, 1):
            entry["cfg"] = {**entry["cfg"], "backend": BACKEND}
    return cfg


def autoquantize(method: str, batches: list[torch.Tensor]) -> tuple[dict, float]:
    """(search state, seconds) of ``mtq.auto_quantize`` on a fresh copy of the built-in teacher."""
    import modelopt.torch.quantization as mtq

    model, _ = load_model("builtin", dtype=torch.float32)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = mtq.auto_quantize(
            model, constraints={"effective_bits": BUDGETS[-1]}, quantization_formats=[nvfp4_config()],
            data_loader=batches, forward_step=lambda m, b: m(input_ids=b, use_cache=False).logits,
            loss_func=lambda out, b: F.cross_entropy(out[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten()),
            disabled_layers=["*lm_head*"], num_calib_steps=len(batches), num_score_steps=len(batches), method=method,
        )
    return state, time.perf_counter() - start


def autoquantize_kept(state: dict, table: UnitTable, bits: float) -> tuple[str, ...]:
    """The units AutoQuantize keeps in BF16 at ``bits``, re-solved from its search state (its own solver: the LP for
    gradient scores, the threshold search for KL scores)."""
    from modelopt.torch.quantization.algorithms import QuantRecipe, _resolve_best_recipe

    recipe = _resolve_best_recipe(state, {"effective_bits": bits})
    none = QuantRecipe(quant_cfg=None)
    kept = {m for name, fmt in recipe.items() if fmt == none for m in state["candidate_stats"][name]["module_names"]}
    return tuple(u.name for u in table.units if kept & set(u.members))


# -- measurements ------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, table: UnitTable, plans: dict[str, tuple[str, ...]], held_out: torch.Tensor,
             problems: int, seeds: list[int]) -> dict[str, dict]:
    """KL, layer CKA, top-1 on held-out text and task accuracy per seed of each distinct plan."""
    measured = compare(model, table, plans, held_out, batch_size=8, bos_token_id=tokenizer.bos_token_id,
                       console=QUIET)
    accuracy = {seed: task_accuracy(model, tokenizer, table, plans, tasks.generate("test", problems, seed))
                for seed in seeds}
    out = {}
    for label in ["teacher", *plans]:
        per_seed = [accuracy[seed][label] for seed in seeds]
        numbers = {k: measured[label][k] for k in ("kl", "mean_cka", "min_cka", "top1")} if label in plans else {}
        out[label] = {**numbers, "task_acc": statistics.mean(per_seed), "task_acc_seeds": per_seed}
    return out


@torch.no_grad()
def held_out_kl(teacher, student, held_out: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) on the held-out sequences."""
    from ckaqad_cli.kl import token_kl

    total = 0.0
    for ids in torch.split(held_out, 8):
        total += float(token_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits).sum())
    return total / held_out.numel()


def run_compare(args: argparse.Namespace) -> dict:
    model, tokenizer = load_model("builtin", dtype=torch.float32)
    calibration = sequences("train", args.calib_tokens, tokenizer)
    held_out = sequences("test", args.eval_tokens, tokenizer)
    batches = list(torch.split(calibration, 8))
    table, _ = prepare(model, "w4a4", ())
    start = time.perf_counter()
    measured = sensitivity.measure(model, table, calibration, batch_size=8, bos_token_id=tokenizer.bos_token_id,
                                   console=QUIET)
    seconds = {"ckaqad (cka, kl and grad together)": time.perf_counter() - start}
    choices: dict[tuple[float, str], tuple[str, ...]] = {}
    for bits in BUDGETS:
        for score in SCORES:
            choices[bits, f"ckaqad {score}"] = choose(table, measured.scores(score), bits).kept
    for method in ("gradient", "kl_div"):
        state, seconds[f"AutoQuantize {method}"] = autoquantize(method, batches)
        for bits in BUDGETS:
            choices[bits, f"AutoQuantize {method}"] = autoquantize_kept(state, table, bits)
    distinct = {kept: f"plan{i}" for i, kept in enumerate(dict.fromkeys([(), *choices.values()]))}
    results = evaluate(model, tokenizer, table, {label: kept for kept, label in distinct.items()}, held_out,
                       args.task_problems, args.eval_seeds)
    rows = [{"budget": None, "method": "teacher", "kept": [], "bits": 16.0, **results["teacher"]},
            {"budget": None, "method": "uniform NVFP4", "kept": [], "bits": table.bits(table.bytes_of(())),
             **results[distinct[()]]}]
    rows += [{"budget": bits, "method": method, "kept": list(kept), "bits": table.bits(table.bytes_of(kept)),
              **results[distinct[kept]]} for (bits, method), kept in choices.items()]
    return {"rows": rows, "seconds": seconds, "calib_tokens": int(calibration.numel()),
            "eval_tokens": int(held_out.numel()), "task_problems": args.task_problems, "eval_seeds": args.eval_seeds,
            "cost": {"forwards_per_batch": measured.forwards_per_batch, "batches": measured.batches},
            "scores": {u.name: {s: measured.scores(s)[u.name] for s in SCORES} for u in table.units}}


def run_distill(args: argparse.Namespace) -> dict:
    """CKA-QAD from uniform NVFP4, AutoQuantize's gradient choice and ckaqad's default choice at ``--budget``."""
    from ckaqad_cli.rundir import RunDir
    from ckaqad_cli.settings.distill import DistillConfig
    from ckaqad_cli.settings.plan import DEFAULT_SCORE
    from ckaqad_cli.stages.distill import run_distill as distill

    model, tokenizer = load_model("builtin", dtype=torch.float32)
    teacher, _ = load_model("builtin", dtype=torch.float32)
    calibration = sequences("train", args.calib_tokens, tokenizer)
    held_out = sequences("test", args.eval_tokens, tokenizer)
    table, _ = prepare(model, "w4a4", ())
    measured = sensitivity.measure(model, table, calibration, batch_size=8, bos_token_id=tokenizer.bos_token_id,
                                   console=QUIET)
    state, _ = autoquantize("gradient", list(torch.split(calibration, 8)))
    starts = {"uniform NVFP4": (), "AutoQuantize gradient": autoquantize_kept(state, table, args.budget),
              f"ckaqad {DEFAULT_SCORE}": choose(table, measured.scores(DEFAULT_SCORE), args.budget).kept}
    out = {}
    for label, kept in starts.items():
        run = RunDir(Path(tempfile.mkdtemp()) / "run")
        cfg = DistillConfig(exclude=tuple(kept_exclude(table, kept)), steps=args.steps, device="cpu")
        summary = distill(cfg, run, console=QUIET, show_progress=False)
        student, _ = load_model(str(run.stage_dir("distill") / "student"), dtype=torch.float32)
        accuracy = [tasks.evaluate(student, tokenizer, tasks.generate("test", args.task_problems, seed))["overall"]
                    for seed in args.eval_seeds]
        out[label] = {"kept": list(kept), "bits": table.bits(table.bytes_of(kept)), "kl": held_out_kl(teacher, student, held_out),
                      "task_acc": statistics.mean(accuracy), "task_acc_seeds": accuracy,
                      "final_eval": summary.get("final_eval")}
    return out


def pareto(result: dict, path: Path) -> None:
    """Task accuracy (mean of the evaluation seeds) against effective bits: uniform NVFP4 and each method, the
    teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    teacher = next(r["task_acc"] for r in result["rows"] if r["method"] == "teacher")
    ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher (BF16)")
    methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "teacher"))
    for k, method in enumerate(methods):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["bits"])
        ax.plot([r["bits"] for r in rows], [r["task_acc"] for r in rows], marker="osD^vP*X"[k % 8], mfc="none",
                ls="-" if len(rows) > 1 else "none", label=method, alpha=0.8)
    ax.set_xlabel("effective bits per Linear weight")
    ax.set_ylabel(f"task accuracy (mean of {len(result['eval_seeds'])} seeds)")
    ax.set_title("built-in teacher, W4A4 PTQ: uniform NVFP4, ckaqad plan, AutoQuantize", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_cost(args: argparse.Namespace) -> dict:
    """Seconds of the sensitivity of every unit and of one diagnose pass, per depth."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for layers in args.layers:
        config = AutoConfig.for_model("qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        ids = torch.randint(0, 151936, (args.cost_tokens // 256, 256), generator=torch.Generator().manual_seed(0))
        table, _ = prepare(model, "w4a4", ())
        start = time.perf_counter()
        measured = sensitivity.measure(model, table, ids, batch_size=4, bos_token_id=None, console=QUIET)
        plan_seconds = time.perf_counter() - start
        start = time.perf_counter()
        compare(model, table, {"ptq": ()}, ids, batch_size=4, bos_token_id=None, console=QUIET)
        diagnose_seconds = time.perf_counter() - start
        out[layers] = {"units": len(table.units), "forwards_per_batch": measured.forwards_per_batch,
                       "plan_seconds": plan_seconds, "diagnose_seconds": diagnose_seconds,
                       "ratio": plan_seconds / diagnose_seconds, "forward_ratio": measured.forwards_per_batch / 2}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("compare", "cost", "distill"))
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--task-problems", type=int, default=256)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--cost-tokens", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="compare: the Pareto plot (task accuracy against bits) as a PNG")
    args = parser.parse_args()
    result = {"compare": run_compare, "cost": run_cost, "distill": run_distill}[args.what](args)
    args.json.write_text(json.dumps(result, indent=1))
    if args.plot is not None and args.what == "compare":
        pareto(result, args.plot)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
