"""The diagnose stage: per-layer CKA of students against their BF16 teacher, beside the output-level numbers.

Hooks capture the residual stream after the embeddings and after every decoder layer; each batch's features go
straight into :class:`~ckaqad_cli.cka_streaming.StreamingCKA` accumulators, so memory does not grow with the number of tokens.
With ``sequential`` the models stay on the CPU and take turns on the device, a chunk of batches at a time; the
teacher's CKA features and final hidden states of the chunk wait on the CPU for the students. With ``device_map``
("auto") accelerate spreads each model over the visible GPUs and the CPU: inputs go to a model's embeddings, and the
hooks bring every captured hidden state to the one device that holds the CKA statistics.

lm-evaluation-harness (optional, imported only when ``lm_eval_tasks`` is set) scores the loaded models themselves on
registered harness tasks, local task YAMLs, or local multiple-choice JSONL files (parsed by
:mod:`ckaqad_cli.lm_eval_tasks`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ckaqad_cli import models
from ckaqad_cli.cka import Standardizer, TokenFilter
from ckaqad_cli.cka_streaming import StreamingCKA
from ckaqad_cli.data import load_texts, pack_sequences
from ckaqad_cli.distributed import pick_device
from ckaqad_cli.errors import CkaqadError, StageDoneError
from ckaqad_cli.kl import token_kl
from ckaqad_cli.lm_eval_tasks import LmEvalPlan, harness_metrics, plan_lm_eval
from ckaqad_cli.planning.recipe import exclude_or_plan
from ckaqad_cli.progress import make_progress
from ckaqad_cli.quant_calibration import fit_channel_weights
from ckaqad_cli.report import write_report
from ckaqad_cli.records import DiagnoseRecord
from ckaqad_cli.rundir import RunDir, describe_input
from ckaqad_cli.safetensors_write import ensure_writable
from ckaqad_cli.settings import BUILTIN_TEACHERS, MSE_ACT_CALIBRATION_TOKENS
from ckaqad_cli.settings.diagnose import DiagnoseConfig

DEVICE_MAPS = ("auto",)
DISTILLED_LABEL = "distilled"
TEACHER_LABEL = "teacher"


def cka_precision(cfg: DiagnoseConfig, model: nn.Module) -> str:
    """--cka-precision, auto resolved: bf16 for a model in bfloat16 (its features are bf16 already), else float32."""
    if cfg.cka_precision != "auto":
        return cfg.cka_precision
    return "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"


def token_filter(cfg: DiagnoseConfig) -> TokenFilter:
    return TokenFilter(cfg.drop_first, cfg.drop_massive, cfg.massive_ratio, cfg.standardize)


@dataclass
class _Model:
    label: str
    spec: str
    model: nn.Module
    tokenizer: object


# -- loading and checks ----------------------------------------------------------------------------------------
def _shape(m: nn.Module) -> tuple[int, int, int]:
    c = m.config
    return len(models.decoder_layers(m)), c.hidden_size, c.vocab_size


def check_compatible(teacher: _Model, student: _Model) -> None:
    """One clear error for a student that cannot be compared with the teacher layer by layer."""
    (tl, th, tv), (sl, sh, sv) = _shape(teacher.model), _shape(student.model)
    if (tl, th) != (sl, sh):
        raise CkaqadError(
            f"student {student.label} has {sl} layers of width {sh}, the teacher {tl} layers of width {th}: "
            "layerwise CKA needs the same architecture"
        )
    if tv != sv or student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise CkaqadError(
            f"student {student.label} has a different vocabulary from the teacher ({sv} vs {tv} entries or different "
            "token ids): KL and CKA need the same tokens"
        )


def _split_students(cfg: DiagnoseConfig, run: RunDir | None) -> list[tuple[str, str]]:
    students = list(cfg.students)
    if cfg.use_run_student and run is not None:
        distilled = run.stage_output("distill", "student")
        if distilled is not None and all(Path(spec) != Path(distilled) for _, spec in students):
            students.append((DISTILLED_LABEL, str(distilled)))
    labels = [label for label, _ in students] + [f"ptq-{s}" for s in cfg.ptq]
    if not labels:
        raise CkaqadError("no student to diagnose: pass --student PATH, --ptq w4a4, or a --run with a distilled one")
    if TEACHER_LABEL in labels:
        raise CkaqadError(f"the label {TEACHER_LABEL!r} names the teacher in the report; give the student another "
                          "(--student LABEL=PATH)")
    duplicates = sorted({lb for lb in labels if labels.count(lb) > 1})
    if duplicates:
        raise CkaqadError(f"student labels must differ; repeated: {', '.join(duplicates)} (use --student LABEL=PATH)")
    return students


def load_models(cfg: DiagnoseConfig, run: RunDir | None, device: torch.device, dtype: torch.dtype):
    """(teacher, [students]) loaded, checked against the teacher; on the CPU when running sequentially.

    With a device map every model is loaded on the CPU, then dispatched over the GPUs and the CPU with a map of its
    own (models.dispatch), in turn: each PTQ student, made while the teacher is still on the CPU, then the teacher,
    then the other students. The host needs memory for the largest model plus, with --ptq, the teacher's copy.
    """
    home = torch.device("cpu") if cfg.sequential or cfg.device_map else device
    kw = {"device": home, "dtype": dtype, "trust_remote_code": cfg.trust_remote_code}

    def placed(model: nn.Module) -> nn.Module:
        return models.dispatch(model) if cfg.device_map else model

    specs = _split_students(cfg, run)
    teacher = _Model(TEACHER_LABEL, cfg.teacher, *models.load_model(cfg.teacher, **kw))
    plan = exclude_or_plan((), run)  # the run's plan, when it has one
    rules = {"scale_rule": cfg.scale_rule, "activation_arithmetic": cfg.activation_arithmetic,
             "exclude": tuple(plan.exclude), "fp8": tuple(plan.fp8)}
    ptq = [_Model(f"ptq-{scheme}", f"{cfg.teacher} (PTQ {scheme})",
                  placed(models.ptq_student(teacher.model, scheme, **rules)[0]), teacher.tokenizer)
           for scheme in cfg.ptq]
    placed(teacher.model)
    students = []
    for label, spec in specs:
        student = _Model(label, spec, *models.load_model(spec, **kw))
        check_compatible(teacher, student)
        placed(student.model)
        students.append(student)
    return teacher, students + ptq


def load_sequences(cfg: DiagnoseConfig, teacher: _Model, texts: list[str] | None = None) -> torch.Tensor:
    """The packed sequences of ``cfg.data`` (``texts``: already read by :func:`read_texts`)."""
    limit = models.max_positions(teacher.model)
    if limit is not None and cfg.seq_len > limit:
        raise CkaqadError(f"--seq-len {cfg.seq_len} is over the teacher's limit of {limit} positions")
    if texts is None:
        texts = read_texts(cfg)
    return pack_sequences(texts, teacher.tokenizer, cfg.seq_len, max_tokens=cfg.max_tokens, seed=cfg.seed)


def read_texts(cfg: DiagnoseConfig) -> list[str]:
    """The texts of ``--data``: read before any model loads, so that a missing or malformed source fails at once."""
    return load_texts(cfg.data, split=cfg.split, seed=cfg.seed, text_field=cfg.text_field)


# -- capture ---------------------------------------------------------------------------------------------------
@dataclass
class _OutputStats:
    tokens: int = 0
    kl: float = 0.0
    top1: float = 0.0
    nll: float = 0.0
    nll_tokens: int = 0

    def add_nll(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        self.nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
        self.nll_tokens += ids[:, 1:].numel()

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.nll_tokens) if self.nll_tokens else math.nan


@dataclass
class _TeacherBatch:
    ids: torch.Tensor
    keep: torch.Tensor
    feats: list[torch.Tensor]  # per layer, [kept tokens, d]
    final_hidden: torch.Tensor


def _features(hidden: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    return [h[keep] for h in hidden]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids``, on the device of ``ids``; the inputs go to the model's embeddings (its first
    device under a device map)."""
    return model(input_ids=ids.to(model.get_input_embeddings().weight.device)).logits.to(ids.device)


@torch.no_grad()
def _teacher_pass(teacher: _Model, ids: torch.Tensor, filt: TokenFilter, std: Standardizer, acc: list[StreamingCKA],
                  stats: _OutputStats, store: torch.device) -> _TeacherBatch:
    with models.capture_residuals(teacher.model, ids.device) as hidden:
        logits = _logits(teacher.model, ids)
    layers, final = hidden[:-1], hidden[-1]
    head_logits = teacher.model.get_output_embeddings()(final[:, -1:]).to(ids.device)
    if not torch.allclose(head_logits.float(), logits[:, -1:].float(), rtol=1e-3, atol=1e-3):
        raise CkaqadError(f"{teacher.spec}: the logits are not the output head of the final hidden states (logit "
                          "soft-capping or scaling); diagnose does not support such models yet")
    keep = filt.mask(ids, None, layers, teacher.tokenizer.bos_token_id)
    feats = _features(layers, keep)
    if filt.standardize:
        feats = [std(i, f, f) for i, f in enumerate(feats)]
    for a, f in zip(acc, feats, strict=True):
        a.update_teacher(f)
    stats.add_nll(logits, ids)
    return _TeacherBatch(ids.to(store), keep.to(store), [f.to(store) for f in feats], final.to(store))


@torch.no_grad()
def _student_pass(student: _Model, tb: _TeacherBatch, teacher_head: nn.Module, std: Standardizer,
                  filt: TokenFilter, acc: list[StreamingCKA], stats: _OutputStats, device: torch.device) -> None:
    ids, keep = tb.ids.to(device), tb.keep.to(device)
    with models.capture_residuals(student.model, device) as hidden:
        logits = _logits(student.model, ids)
    feats = _features(hidden[:-1], keep)
    for i, (a, f) in enumerate(zip(acc, feats, strict=True)):
        if filt.standardize:
            f = std(i, f, f)
        a.update_student(student.label, f, tb.feats[i].to(device))
    teacher_logits = teacher_head(tb.final_hidden.to(device)).to(device)
    stats.kl += float(token_kl(logits, teacher_logits).sum())
    stats.top1 += float((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
    stats.tokens += ids.numel()
    stats.add_nll(logits, ids)


# -- the stage -------------------------------------------------------------------------------------------------
def measure(teacher: _Model, students: list[_Model], sequences: torch.Tensor, cfg: DiagnoseConfig,
            device: torch.device, console: Console) -> dict:
    """Stream the sequences through teacher and students; per-layer CKA and output-level numbers."""
    n_layers = len(models.decoder_layers(teacher.model)) + 1
    acc = [StreamingCKA(cka_precision(cfg, teacher.model)) for _ in range(n_layers)]
    filt, std = token_filter(cfg), Standardizer()
    t_stats, s_stats = _OutputStats(), {s.label: _OutputStats() for s in students}
    batches = list(torch.split(sequences, cfg.batch_size))
    chunk = cfg.chunk_batches if cfg.sequential else 1
    store = torch.device("cpu") if cfg.sequential else device
    teacher_head = teacher.model.get_output_embeddings()
    if cfg.sequential:
        teacher_head = copy.deepcopy(teacher_head).to(device)
    with make_progress(console, transient=True) as progress:
        task = progress.add_task("diagnose", total=len(batches))
        for start in range(0, len(batches), chunk):
            group = batches[start : start + chunk]
            with _on_device(teacher.model, device, cfg.sequential):
                kept = [_teacher_pass(teacher, b.to(device), filt, std, acc, t_stats, store) for b in group]
            for s in students:
                with _on_device(s.model, device, cfg.sequential):
                    for tb in kept:
                        _student_pass(s, tb, teacher_head, std, filt, acc, s_stats[s.label], device)
            progress.advance(task, len(group))
    if acc[0].tokens < 4:
        raise CkaqadError(f"only {acc[0].tokens} tokens passed the token filters; CKA needs at least 4")
    out = {"teacher": {"perplexity": t_stats.perplexity}, "students": {}, "cka_tokens": acc[0].tokens,
           "tokens": int(sequences.numel())}
    for s in students:
        st = s_stats[s.label]
        linear = [a.linear(s.label) for a in acc]
        debiased = [a.debiased(s.label) for a in acc]
        out["students"][s.label] = {
            "spec": s.spec,
            "linear_cka": linear,
            "debiased_cka": debiased,
            "mean_cka": sum(linear[1:]) / len(linear[1:]),
            "min_cka": min(linear[1:]),
            "worst_layer": 1 + min(range(len(linear) - 1), key=lambda i: linear[i + 1]),
            "mean_debiased_cka": sum(debiased[1:]) / len(debiased[1:]),
            "kl": st.kl / st.tokens,
            "top1": st.top1 / st.tokens,
            "perplexity": st.perplexity,
        }
    return out


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device, sequential: bool) -> Iterator[None]:
    if not sequential:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# The recorded settings that do not change a teacher's or PTQ student's task accuracy.
_NOT_IN_TASK_MEMO_KEY = ("stage", "students", "force", "use_run_student", "lm_eval_tasks")


def task_accuracy(teacher: _Model, students: list[_Model], cfg: DiagnoseConfig, device: torch.device,
                  memo: dict[str, dict] | None = None, settings: dict | None = None) -> dict:
    """Exact-match accuracy of greedy decoding on the built-in teacher's task suite (only with a built-in teacher).

    ``memo`` keeps the teacher's and the PTQ students' results under the stage's recorded ``settings``: the pipeline's
    final diagnose reads them from its PTQ diagnose instead of decoding the same problems with the same models again
    (a distilled student is always decoded: its files are outside the memo's knowledge).
    """
    if cfg.teacher not in BUILTIN_TEACHERS or cfg.task_problems <= 0:
        return {}
    from ckaqad_cli.builtin import suite

    tasks = suite(cfg.teacher)
    problems = tasks.generate("test", cfg.task_problems, cfg.seed)
    shared = {k: v for k, v in (settings or {}).items() if k not in _NOT_IN_TASK_MEMO_KEY}
    out = {}
    for m in [teacher, *students]:
        key = None
        if memo is not None and (m is teacher or m.label.startswith("ptq-")):
            key = json.dumps({"model": m.label, **shared}, sort_keys=True, default=str)
        if key in (memo or {}):
            out[m.label] = memo[key]
            continue
        with _on_device(m.model, device, cfg.sequential):
            out[m.label] = tasks.evaluate(m.model, m.tokenizer, problems)
        if key is not None:
            memo[key] = out[m.label]
    return out


def _require(module: str, package: str, option: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CkaqadError(f"{option} needs {package}: pip install {package} (or pip install 'ckaqad[eval]')")


def check_device_map(cfg: DiagnoseConfig) -> None:
    """One clear error for a device map that cannot work with the other options."""
    if cfg.device_map is None:
        return
    if cfg.device_map not in DEVICE_MAPS:
        raise CkaqadError(f"--device-map must be {' or '.join(DEVICE_MAPS)}; got {cfg.device_map!r}")
    if cfg.sequential:
        raise CkaqadError("--device-map and --sequential exclude each other: --sequential moves each whole model to "
                          "one device in turn, --device-map spreads each model over the GPUs and the CPU")
    if cfg.device != "auto":
        raise CkaqadError(f"--device-map places the models itself: leave --device at auto (got {cfg.device!r})")
    _require("accelerate", "accelerate", "--device-map")


def lm_eval_scores(teacher: _Model, students: list[_Model], plan: LmEvalPlan | None, cfg: DiagnoseConfig,
                   device: torch.device) -> dict:
    """{label: {task: {metric: {"value", "stderr"}}}}: lm-evaluation-harness on the loaded models and tokenizers."""
    if plan is None:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    out = {}
    for m in [teacher, *students]:
        with _on_device(m.model, device, cfg.sequential):
            lm = HFLM(pretrained=m.model, tokenizer=m.tokenizer, batch_size=cfg.batch_size)
            tasks = copy.deepcopy(plan.tasks)  # older harnesses pop keys from the configs they are given
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=plan.manager, log_samples=False)
        out[m.label] = {task: harness_metrics(values) for task, values in res["results"].items()}
    return out


def run_diagnose(cfg: DiagnoseConfig, run: RunDir, *, console: Console | None = None,
                 task_memo: dict[str, dict] | None = None) -> dict:
    """Load, check, measure, write diagnose/report.json, report.md and cka.png; record the stage. The report.

    ``task_memo``: see :func:`task_accuracy` (the pipeline shares one between its two diagnose stages)."""
    console = console or Console(stderr=True)
    cfg.check()
    check_device_map(cfg)
    token_filter(cfg)  # checks --massive-ratio
    if cfg.lm_eval_tasks:
        _require("lm_eval", "lm-eval", "--lm-eval-tasks")
    done = run.stage_entry(cfg.stage)
    if done and done.get("status") == "done" and not cfg.force:  # fail before loading any model
        raise StageDoneError(f"stage {cfg.stage} already finished in {run.path}; pass --force to run it again")
    models.check_spec(cfg.teacher, "--teacher")
    for _, spec in _split_students(cfg, run):
        models.check_spec(spec, "--student")
    lm_eval_plan = plan_lm_eval(cfg.lm_eval_tasks)
    texts = read_texts(cfg)
    ensure_writable(run.path, "--run")
    if run.stage_dir(cfg.stage).exists():
        ensure_writable(run.stage_dir(cfg.stage), "--run")
    device = pick_device(cfg.device)
    dtype = models.compute_dtype(cfg.dtype, device)
    teacher, students = load_models(cfg, run, device, dtype)
    sequences = load_sequences(cfg, teacher, texts)
    if cfg.scale_rule == "mse-act":  # the PTQ students' channel weights
        calibration = sequences[: max(1, MSE_ACT_CALIBRATION_TOKENS // cfg.seq_len)]
        for student in students:
            if student.label.startswith("ptq-"):
                fit_channel_weights(student.model, calibration)
    inputs = {"teacher": describe_input(cfg.teacher), "data": describe_input(cfg.data)}
    inputs.update({f"student:{s.label}": describe_input(s.spec) for s in students if not s.label.startswith("ptq-")})
    inputs.update({f"lm_eval:{f}": describe_input(f) for f in (lm_eval_plan.files if lm_eval_plan else [])})
    config = {**asdict(cfg), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if cfg.ptq:  # what the PTQ students kept in BF16 beyond the default and put in FP8: the run's plan, if any
        plan = exclude_or_plan((), run)
        config["ptq_exclude"] = plan.exclude
        if plan.fp8:
            config["ptq_fp8"] = plan.fp8
    with run.stage(cfg.stage, config=config, inputs=inputs, force=cfg.force) as rec:
        report = measure(teacher, students, sequences, cfg, device, console)
        report.update(
            teacher_spec=cfg.teacher,
            filters=token_filter(cfg).describe(),
            cka_precision=cka_precision(cfg, teacher.model),
            layers=["embeddings"] + [f"layer {i}" for i in range(1, len(models.decoder_layers(teacher.model)) + 1)],
            task_accuracy=task_accuracy(teacher, students, cfg, device, task_memo, config),
            lm_eval=lm_eval_scores(teacher, students, lm_eval_plan, cfg, device),
            seq_len=cfg.seq_len,
        )
        paths = write_report(report, run.stage_dir(cfg.stage), console=console)
        DiagnoseRecord.write(rec, **{key: run.relpath(p) for key, p in paths.items()},
                             students=summary_metrics(report))
    return report


def summary_metrics(report: dict) -> dict:
    """{label: mean_cka, min_cka, kl, top1 (, task_acc) (, "TASK/METRIC" of lm-eval)} for run.json."""
    out = {}
    for label, s in report["students"].items():
        m = {k: s[k] for k in ("mean_cka", "min_cka", "kl", "top1")}
        acc = report.get("task_accuracy", {}).get(label)
        if acc is not None:
            m["task_acc"] = acc["overall"]
        for task, metrics in report.get("lm_eval", {}).get(label, {}).items():
            m.update({f"{task}/{metric}": v["value"] for metric, v in metrics.items()})
        out[label] = m
    return out
