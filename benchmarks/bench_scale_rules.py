"""Per-layer NVFP4 weight error of the block-scale rules: ckaqad's (docs/nvfp4.md, "Scale rules") against ModelOpt's.

    python benchmarks/bench_scale_rules.py --weights builtin
    python benchmarks/bench_scale_rules.py --weights qwen3-0.6b --layers 0 --rows 128
    python benchmarks/bench_scale_rules.py --ptq --seeds 0,1,2 --accuracy 0

For every quantized Linear weight it reports two errors relative to the weight itself, in float64:
``mse`` = sum (w - q)^2 / sum w^2, and ``out`` = sum over blocks of dw^T H dw / w^T H w with H = E[x x^T] the 16 x 16
input covariance of each block from calibration inputs (the expected output error; what local-Hessian minimizes).

ckaqad's rules run through ckaqad_kernels.dispatch (the C kernel). ModelOpt's Four-over-Six and local-Hessian
searches do not run on the CPU (``mtq.quantize`` fails: the static NVFP4 fake quantization they call,
``StaticBlockwiseFP4FakeQuantFunction``, raises "static_blockwise_fp4_fake_quant requires triton" because
``modelopt/torch/kernels/quantization/gemm/__init__.py`` only loads its Triton kernels when
``torch.cuda.is_available()``; with W4A4 inputs the dynamic input quantizer asserts "amax must be a CUDA tensor"
first). So the ``mo-*`` columns run ModelOpt's own calibrator code (``MseCalibrator`` / ``NVFP4MSECalibrator``
reference sweep, ``fp8_scale_candidates``, ``compute_fp4_scales``, ``_LocalHessianAccumulator``'s error function)
with the one Triton piece, ``nvfp4_scalar_quant``, transcribed to torch (IEEE division where the GPU divides
approximately):

- ``mo-4/6``: NVFP4_FOUR_OVER_SIX_CFG's algorithm (mse, multipliers 1.0 and 1.5, FP8 normalization 256);
- ``mo-mse``: NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP's weight search (all 126 E4M3 scales, squared error);
- ``mo-lh``: NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG's weight search (all 126 scales, full 16 x 16 local Hessian).

``--weights builtin`` uses the built-in teacher and its own inputs on generated task text; ``qwen3-0.6b`` a random
model of Qwen3-0.6B's shapes (hidden 1024, intermediate 3072, 16 query / 8 key-value heads of 128): weights
N(0, 0.02^2) times a log-normal(0, 0.5) scale per output row, in bf16, and inputs N(0, 1) times a log-normal(0, 1)
scale per channel (outlier channels), ``--tokens`` of them per projection input. Prints a markdown table per layer
and the mean ratio of each rule's error to amax's, and the same as JSON with ``--json``.

``--ptq`` instead measures the built-in teacher's PTQ students, one per rule and scheme (weights frozen to their
quantized values; mse-act calibrated on ``--samples`` training texts; W4A4 inputs dynamic, as ptq_student): the mean
KL(teacher || student) per token and the mean and min linear CKA of the residual stream after each decoder layer,
teacher-forced on ``--texts`` held-out texts per seed, and exact-match accuracy on ``--accuracy`` problems per seed
(greedy decoding is slow on the CPU; 0 skips it). With ``--accuracy`` the BF16 teacher answers the same problems, and
the table gives each student's accuracy (mean over seeds +- one standard error over the seeds), its loss against the
teacher and its gain over amax, both as paired differences over all the seeds' problems +- one paired standard error
(sd of the per-problem differences / sqrt(problems)), and the fraction of amax's loss the rule cuts.

``--rules bf16-weights`` adds a student whose weights stay BF16 and only its inputs are quantized (for W4A4: the
activations' share of the loss, which no weight scale rule can cut).

``--students RULE=DIR`` (repeatable) measures distilled students (``ckaqad distill``'s ``RUN/distill/student``) the
same way, under the scheme label ``qad``, instead of the PTQ students: e.g. CKA-QAD from each rule's PTQ student.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ckaqad_kernels import dispatch, nvfp4_ref
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE, SCALE_RULES

QWEN3_0_6B = {"hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8, "head_dim": 128, "layers": 28}
MODELOPT_RULES = ("mo-4/6", "mo-mse", "mo-lh")


# -- inputs ----------------------------------------------------------------------------------------------------


def builtin_layers(samples: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, bf16 weight [out, in], float32 inputs [tokens, in]) of every quantized Linear of the built-in teacher,
    the inputs recorded on ``samples`` generated training texts."""
    from ckaqad_cli.builtin.tasks import generate
    from ckaqad_cli.models import load_model
    from ckaqad_cli.settings import BUILTIN
    from ckaqad_cli.quant import DEFAULT_EXCLUDE

    model, tokenizer = load_model(BUILTIN, dtype=torch.bfloat16)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in DEFAULT_EXCLUDE)}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for problem in generate("train", samples, seed=0):
            ids = tokenizer(problem.text, return_tensors="pt")["input_ids"]
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    for name, module in linears.items():
        yield name, module.weight.detach(), torch.cat(inputs[name]).float()


def qwen_layers(layers: list[int], tokens: int, rows: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """The seven Linears of the given layers of a Qwen3-0.6B-shaped random model (see the module docstring), each
    cut to its first ``rows`` output rows (a sample of its blocks: ModelOpt's CPU sweeps are slow)."""
    c = QWEN3_0_6B
    h, i, q, kv = c["hidden"], c["intermediate"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    shared = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
              "mlp.up_proj": "mlp.gate_proj"}
    for layer in layers:
        gen = torch.Generator().manual_seed(layer)
        inputs: dict[str, torch.Tensor] = {}
        for leaf, (out, cols) in shapes.items():
            row_scale = torch.randn(out, 1, generator=gen).mul(0.5).exp()
            weight = (torch.randn(out, cols, generator=gen) * 0.02 * row_scale).to(torch.bfloat16)[:rows]
            if leaf in shared:
                x = inputs[shared[leaf]]
            else:
                x = torch.randn(tokens, cols, generator=gen) * torch.randn(cols, generator=gen).exp()
            inputs[leaf] = x
            yield f"model.layers.{layer}.{leaf}", weight, x


# -- ModelOpt's searches on the CPU ----------------------------------------------------------------------------


def _modelopt():
    """ModelOpt's CPU-runnable pieces (imported late: modelopt warns about the transformers version on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.kernels.quantization.gemm.fp4_kernel import compute_fp4_scales
        from modelopt.torch.quantization.calib.mse import MseCalibrator, NVFP4MSECalibrator
        from modelopt.torch.quantization.model_calib import _LocalHessianAccumulator
    return compute_fp4_scales, MseCalibrator, NVFP4MSECalibrator, _LocalHessianAccumulator


def _fp4_round_magnitude(a: torch.Tensor) -> torch.Tensor:
    """modelopt/torch/kernels/quantization/common/nvfp4_quant.py fp4_round_magnitude, in torch."""
    out = torch.full_like(a, 6.0)
    for bound, inclusive, value in ((5.0, True, 4.0), (3.5, False, 3.0), (2.5, True, 2.0), (1.75, False, 1.5),
                                    (1.25, True, 1.0), (0.75, False, 0.5), (0.25, True, 0.0)):
        out = torch.where(a <= bound if inclusive else a < bound, value, out)
    return out


def _modelopt_quant_func(global_amax: torch.Tensor, fp8_max: float) -> Callable:
    """static_blockwise_fp4_fake_quant (fp4_kernel.py) on [blocks, 16] float32: ModelOpt's compute_fp4_scales, then
    nvfp4_scalar_quant transcribed (|x| / scale rounded, times scale, the sign of x; a zero scale zeroes the block)."""
    compute_fp4_scales = _modelopt()[0]

    def quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        scale = compute_fp4_scales(amax, global_amax, True, fp8_max).reshape(-1, 1)
        bad = (scale == 0) | scale.isnan() | scale.isinf()
        safe = torch.where(bad, torch.ones_like(scale), scale)
        q = _fp4_round_magnitude(x.abs() / safe) * safe
        return torch.where(scale == 0, 0.0, torch.where(x >= 0, q, -q))

    return quant


def modelopt_search(rule: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """ModelOpt's weight search of ``rule`` (MODELOPT_RULES): the fake-quantized weight, float32 [out, in]."""
    _, MseCalibrator, NVFP4MSECalibrator, LocalHessian = _modelopt()
    rows, cols = weight.shape
    blocks = weight.float().reshape(-1, BLOCK_SIZE)
    block_amax = blocks.abs().amax(-1)
    global_amax = block_amax.max()
    fp8_max = 256.0 if rule == "mo-4/6" else 448.0
    quant = _modelopt_quant_func(global_amax, fp8_max)
    if rule == "mo-4/6":
        cal = MseCalibrator(block_amax, axis=0, step_size=0.5, start_multiplier=1.0, stop_multiplier=1.5,
                            quant_func=quant)
        cal.collect(blocks)
        best = cal.compute_amax()
    else:
        error_func = None
        if rule == "mo-lh":
            acc = LocalHessian(rows, cols, BLOCK_SIZE)
            acc.hessian_per_block, acc.num_samples = hessian.clone(), 1  # already E[x x^T]
            error_func = acc.build_error_func()
        cal = NVFP4MSECalibrator(block_amax, global_amax, axis=0, quant_func=quant, error_func=error_func)
        cal.collect(blocks)
        best = cal.compute_amax()
    return quant(blocks, best).reshape(rows, cols)


# -- PTQ students of the built-in teacher ------------------------------------------------------------------------


WEIGHTS_BF16 = "bf16-weights"
"""The --ptq pseudo-rule of a student whose weights stay BF16 and only its inputs are quantized (W4A4's activation
quantization alone): the floor of what any weight scale rule can reach."""


def ptq_student(teacher: torch.nn.Module, tokenizer, scheme: str, rule: str, samples: int) -> torch.nn.Module:
    """A fake-quantized copy of the teacher under ``rule``, its weights frozen to their quantized values (for
    WEIGHTS_BF16, left in BF16: only the inputs are quantized)."""
    import copy

    from ckaqad_cli.builtin.tasks import generate
    from ckaqad_cli.quant import (apply_fake_quant, freeze_quantized_weights, set_channel_weights,
                                  stop_weight_quantization)

    if rule == WEIGHTS_BF16:
        student = copy.deepcopy(teacher).eval().requires_grad_(False)
        apply_fake_quant(student, scheme=scheme)
        stop_weight_quantization(student)
        return student

    from ckaqad_cli.quant_calibration import record_inputs

    student = copy.deepcopy(teacher).eval().requires_grad_(False)
    apply_fake_quant(student, scheme=scheme, scale_rule=rule)
    if rule == "mse-act":
        with torch.no_grad(), record_inputs(student) as record:
            for problem in generate("train", samples, seed=0):
                student(input_ids=tokenizer(problem.text, return_tensors="pt")["input_ids"])
        set_channel_weights(student, record.second_moments())
    with torch.no_grad():
        freeze_quantized_weights(student)
    return student


def compare(teacher, student, tokenizer, texts: list[str]) -> dict[str, float]:
    """Mean per-token KL(teacher || student) and the linear CKA of each layer's residual stream, teacher-forced."""
    from ckaqad_cli.cka import linear_cka

    kl_sum, tokens = 0.0, 0
    hidden: dict[str, list[list[torch.Tensor]]] = {"t": [], "s": []}
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            t = teacher(input_ids=ids, output_hidden_states=True)
            s = student(input_ids=ids, output_hidden_states=True)
            logp_t = t.logits.float().log_softmax(-1)[0]
            logp_s = s.logits.float().log_softmax(-1)[0]
            kl_sum += float((logp_t.exp() * (logp_t - logp_s)).sum())
            tokens += ids.shape[1]
            hidden["t"].append([h[0].float() for h in t.hidden_states[1:]])
            hidden["s"].append([h[0].float() for h in s.hidden_states[1:]])
    ckas = [float(linear_cka(torch.cat([h[i] for h in hidden["t"]]), torch.cat([h[i] for h in hidden["s"]])))
            for i in range(len(hidden["t"][0]))]
    return {"kl": kl_sum / tokens, "cka_mean": sum(ckas) / len(ckas), "cka_min": min(ckas)}


def answers_correct(model, tokenizer, problems) -> list[bool]:
    """Exact match of each problem's greedy answer, in problem order, batched as tasks.evaluate batches (one family
    per batch of 64), so that the mean is evaluate's ``overall``."""
    from ckaqad_cli.builtin.tasks import greedy_answers

    hits: dict[int, bool] = {}
    for family in dict.fromkeys(p.family for p in problems):
        index = [i for i, p in enumerate(problems) if p.family == family]
        for start in range(0, len(index), 64):
            batch = index[start : start + 64]
            answers = greedy_answers(model, tokenizer, [problems[i].prompt for i in batch])
            hits.update({i: a == problems[i].answer for i, a in zip(batch, answers)})
    return [hits[i] for i in range(len(problems))]


def load_distilled(directory: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A distilled student (``RUN/distill/student``) fake-quantized as distill ran it, in ``dtype``, with its mse-act
    channel weights when it has them."""
    from ckaqad_cli.models import load_model
    from ckaqad_cli.quant import set_channel_weights
    from ckaqad_cli.quant_calibration import SECOND_MOMENTS_FILE, load_second_moments

    student, _ = load_model(directory, dtype=dtype)
    if (directory / SECOND_MOMENTS_FILE).is_file():
        set_channel_weights(student, load_second_moments(directory))
    return student


def measure_ptq(rules: list[str], seeds: list[int], texts: int, accuracy: int, samples: int,
                students: dict[str, Path] | None = None, schemes: tuple[str, ...] = ("w4a16", "w4a4")) -> dict:
    """{scheme: {rule: {metric: [one value per seed]}}} for the built-in teacher's PTQ students (or, with
    ``students``, {"qad": {rule: ...}} for those distilled students); with ``accuracy`` also "teacher": {"accuracy":
    [per seed]} and, per student, "correct" / the teacher's "correct": [per seed [0/1 per problem]]."""
    from ckaqad_cli.builtin.tasks import generate
    from ckaqad_cli.models import load_model
    from ckaqad_cli.settings import BUILTIN

    teacher, tokenizer = load_model(BUILTIN, dtype=torch.bfloat16)
    teacher.eval().requires_grad_(False)
    report: dict[str, dict] = {}
    if accuracy:
        teacher_row: dict[str, list] = {"accuracy": [], "correct": []}
        for seed in seeds:
            hits = answers_correct(teacher, tokenizer, generate("test", accuracy, seed))
            teacher_row["accuracy"].append(sum(hits) / len(hits))
            teacher_row["correct"].append([int(h) for h in hits])
        report["teacher"] = teacher_row
        print(f"teacher: accuracy {sum(teacher_row['accuracy']) / len(seeds):.4g}", flush=True)
    if students:
        todo = [("qad", rule, lambda d=directory: load_distilled(d)) for rule, directory in students.items()]
    else:
        todo = [(scheme, rule, lambda s=scheme, r=rule: ptq_student(teacher, tokenizer, s, r, samples))
                for scheme in schemes for rule in rules]
    for scheme, rule, build in todo:
        student = build()
        row: dict[str, list] = {}
        started = time.perf_counter()
        for seed in seeds:
            metrics = {}
            if texts:
                metrics = compare(teacher, student, tokenizer, [p.text for p in generate("test", texts, seed)])
            if accuracy:
                hits = answers_correct(student, tokenizer, generate("test", accuracy, seed))
                metrics["accuracy"] = sum(hits) / len(hits)
                row.setdefault("correct", []).append([int(h) for h in hits])
            for key, value in metrics.items():
                row.setdefault(key, []).append(value)
        report.setdefault(scheme, {})[rule] = row
        print(f"{scheme} {rule} ({time.perf_counter() - started:.0f} s): "
              + ", ".join(f"{k} {sum(v) / len(v):.4g}" for k, v in row.items() if k != "correct"), flush=True)
    return report


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and one standard error of the mean (sample sd / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def _flat(per_seed: list[list[int]]) -> list[int]:
    return [c for seed in per_seed for c in seed]


def ptq_markdown(report: dict) -> str:
    lines = []
    teacher = report.get("teacher")
    if teacher:
        mean, se = _mean_se(teacher["accuracy"])
        lines += [f"BF16 teacher accuracy on the same problems: {100 * mean:.2f}% +- {100 * se:.2f} "
                  f"(seeds: {', '.join(f'{100 * a:.2f}%' for a in teacher['accuracy'])})", ""]
    for scheme, rows in report.items():
        if scheme == "teacher":
            continue
        metrics = [m for m in next(iter(rows.values())) if m not in ("correct", "accuracy")]
        head = [f"{m} (mean +- SE over seeds)" for m in metrics]
        if teacher and "accuracy" in next(iter(rows.values())):
            head += ["accuracy (mean +- SE over seeds)", "loss vs teacher, points (paired SE)",
                     "gain over amax, points (paired SE)", "fraction of amax's loss cut"]
        lines += [f"| {scheme} rule | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        base = rows.get("amax")
        for rule, row in rows.items():
            cells = [f"{_mean_se(row[m])[0]:.4g} +- {_mean_se(row[m])[1]:.2g}" for m in metrics]
            if teacher and "accuracy" in row:
                mean, se = _mean_se(row["accuracy"])
                cells.append(f"{100 * mean:.2f}% +- {100 * se:.2f}")
                loss = [t - c for t, c in zip(_flat(teacher["correct"]), _flat(row["correct"]))]
                l_mean, l_se = _mean_se(loss)
                cells.append(f"{100 * l_mean:.2f} +- {100 * l_se:.2f}")
                if base is not None:
                    gain = [c - b for c, b in zip(_flat(row["correct"]), _flat(base["correct"]))]
                    g_mean, g_se = _mean_se(gain)
                    base_loss = _mean_se([t - b for t, b in zip(_flat(teacher["correct"]), _flat(base["correct"]))])[0]
                    cells.append(f"{100 * g_mean:+.2f} +- {100 * g_se:.2f}")
                    cells.append(f"{g_mean / base_loss:+.2f}" if base_loss > 0 else "")
                else:
                    cells += ["", ""]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- errors ----------------------------------------------------------------------------------------------------


def block_hessian(x: torch.Tensor) -> torch.Tensor:
    """E[x x^T] per block of 16 input channels: [in / 16, 16, 16] float64."""
    xb = x.double().T.reshape(-1, BLOCK_SIZE, x.shape[0])
    return xb @ xb.transpose(-1, -2) / x.shape[0]


def errors(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> dict[str, float]:
    w = weight.double()
    dw = (quantized.double() - w).reshape(w.shape[0], -1, BLOCK_SIZE)
    wb = w.reshape(w.shape[0], -1, BLOCK_SIZE)
    out = torch.einsum("cnb,nbd,cnd->", dw, hessian, dw) / torch.einsum("cnb,nbd,cnd->", wb, hessian, wb)
    return {"mse": float(dw.square().sum() / w.square().sum()), "out": float(out)}


def ckaqad_quantized(rule: str, weight: torch.Tensor, second_moments: torch.Tensor) -> torch.Tensor:
    g = nvfp4_ref.global_scale_from_amax(nvfp4_ref.tensor_amax(weight))
    weights = second_moments.float() if rule == "mse-act" else None
    packed, scales, g = dispatch.quantize_and_pack(weight, g, scale_rule=rule, channel_weights=weights)
    return nvfp4_ref.dequantize(packed, scales, g)


def measure(layers: Iterator[tuple[str, torch.Tensor, torch.Tensor]], rules: list[str]) -> dict[str, dict]:
    """{layer: {rule: {"mse": ..., "out": ..., "seconds": ...}}}."""
    report: dict[str, dict] = {}
    for name, weight, x in layers:
        hessian = block_hessian(x)
        second_moments = x.double().square().mean(0)
        row = {}
        for rule in rules:
            started = time.perf_counter()
            if rule in SCALE_RULES:
                q = ckaqad_quantized(rule, weight, second_moments)
            else:
                q = modelopt_search(rule, weight, hessian.float())
            row[rule] = {**errors(weight, q, hessian), "seconds": time.perf_counter() - started}
        report[name] = row
        print(f"{name}: " + ", ".join(f"{r} {v['mse']:.4g}/{v['out']:.4g}" for r, v in row.items()), flush=True)
    return report


def markdown(report: dict[str, dict], rules: list[str], metric: str) -> str:
    lines = [f"| layer ({metric}, relative to the weight) | " + " | ".join(rules) + " |",
             "|---|" + "---|" * len(rules)]
    for name, row in report.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[r][metric]:.4e}" for r in rules) + " |")
    means = {r: sum(row[r][metric] / row["amax"][metric] for row in report.values()) / len(report) for r in rules}
    lines.append("| **mean ratio to amax** | " + " | ".join(f"**{means[r]:.3f}**" for r in rules) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", choices=("builtin", "qwen3-0.6b"), default="builtin")
    parser.add_argument("--layers", default="0", help="qwen3-0.6b: comma-separated layer indices (default 0)")
    parser.add_argument("--tokens", type=int, default=512, help="qwen3-0.6b: input rows per projection (default 512)")
    parser.add_argument("--rows", type=int, default=128, help="qwen3-0.6b: output rows kept per weight (default 128)")
    parser.add_argument("--samples", type=int, default=256, help="builtin: calibration texts (default 256)")
    parser.add_argument("--rules", default=",".join((*SCALE_RULES, *MODELOPT_RULES)))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--ptq", action="store_true", help="measure the built-in teacher's PTQ students instead")
    parser.add_argument("--seeds", default="0,1,2", help="--ptq: held-out draws (default 0,1,2)")
    parser.add_argument("--texts", type=int, default=256,
                        help="--ptq: texts for KL and CKA per seed (default 256; 0 skips them)")
    parser.add_argument("--accuracy", type=int, default=0, help="--ptq: problems for exact match per seed (default 0)")
    parser.add_argument("--schemes", default="w4a16,w4a4", help="--ptq: schemes of the PTQ students (default both)")
    parser.add_argument("--students", action="append", default=[], metavar="RULE=DIR",
                        help="--ptq: measure these distilled students (label=directory) instead of PTQ students")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if args.ptq:
        students = {label: Path(path) for label, _, path in (s.partition("=") for s in args.students)}
        report = measure_ptq([r for r in rules if r in (*SCALE_RULES, WEIGHTS_BF16)],
                             [int(v) for v in args.seeds.split(",")],
                             args.texts, args.accuracy, args.samples, students,
                             tuple(v.strip() for v in args.schemes.split(",") if v.strip()))
        print("\n" + ptq_markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    unknown = set(rules) - set(SCALE_RULES) - set(MODELOPT_RULES)
    if unknown or "amax" not in rules:
        parser.error(f"unknown rules {sorted(unknown)} (amax is needed as the baseline)")
    if args.weights == "builtin":
        layers = builtin_layers(args.samples)
    else:
        layers = qwen_layers([int(v) for v in args.layers.split(",")], args.tokens, args.rows)
    report = measure(layers, rules)
    for metric in ("mse", "out"):
        print("\n" + markdown(report, rules, metric))
    if args.json:
        args.json.write_text(json.dumps({"weights": args.weights, "rules": rules, "layers": report}, indent=1))


if __name__ == "__main__":
    main()
