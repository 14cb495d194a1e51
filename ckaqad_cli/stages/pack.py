"""The pack stage: write a real NVFP4 checkpoint (compressed-tensors or ModelOpt) from a distilled student or any
local HF causal LM, one tensor at a time.

Flow: resolve the source -> the quantization recipe (the student's own, or quant's selection for plain PTQ) -> W4A4
input amax calibration on the fake-quantized model -> a write plan (every output tensor's name, dtype and shape)
-> disk-space check -> stream: read a fused group's weights, share one global scale, quantize-and-pack with the
kernels, write -> configs, tokenizer files, model card -> optional verify -> summary. The jobs live in
``ckaqad_cli/packing/`` (plan, calibrate, write, verify); this module is the stage: its options, the orchestration,
the run.json record and the summary.

The packed weights are exactly the student's fake-quantized weights: the same kernels, the same group global scale
(``quant.group_weight_global_scale``), so decoding the output gives the weights distill's forward pass used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckaqad_cli import formats
from ckaqad_cli.atomic import atomic_directory, atomic_write_json, atomic_write_text, check_replaceable
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.packing.calibrate import calibrate_input_amax, fill_input_amax, load_student
from ckaqad_cli.packing.plan import PackPlan, build_recipe, deploy_dtype, plan_pack
from ckaqad_cli.packing.verify import raise_if_failed, verify_logits, verify_weights
from ckaqad_cli.packing.write import kernel_description, write_configs, write_tensors
from ckaqad_cli.quant import check_scheme
from ckaqad_cli.rundir import RunDir, describe_input
from ckaqad_cli.safetensors_io import (
    SafetensorsSource,
    ShardedWriter,
    copy_files,
    ensure_disk_space,
    ensure_writable,
    parse_size,
)
from ckaqad_cli.units import format_bytes
from ckaqad_kernels import dispatch, nvfp4_cpu

STAGE = "pack"
OUTPUT_DIR = "model"
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = ("auto", "bfloat16", "float16", "float32")
AUTO_VERIFY_MAX_BYTES = 2 * 10**9
"""--verify defaults to on for sources up to this size (it loads the student and the packed model in memory)."""



@dataclass
class PackConfig:
    """Options of ``ckaqad pack`` (what run.json records)."""

    model: str | None = None
    """Source HF directory; None = the run's distilled student."""
    out: str | None = None
    """Output directory; None = RUN/pack/model."""
    format: str = formats.DEFAULT_FORMAT
    scheme: str | None = None
    """w4a4 | w4a16; None = the student's recipe scheme (w4a4 for plain PTQ)."""
    exclude: list[str] = field(default_factory=list)
    max_shard_size: str = "5GB"
    calib_data: str | None = None
    calib_tokens: int = 4096
    calib_seq_len: int = 256
    verify: bool | None = None
    force: bool = False
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"
    """dtype of the tensors left unquantized (and config.json's): auto = the source's, but bfloat16 for a distilled
    student (distill keeps float32 master weights)."""

    def __post_init__(self) -> None:
        formats.format_module(self.format)
        if self.dtype not in DTYPES:
            raise CkaqadError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.scheme is not None:
            check_scheme(self.scheme)
        if self.calib_tokens < 1 or self.calib_seq_len < 2:
            raise CkaqadError("--calib-tokens must be positive and --calib-seq-len at least 2")
        if self.backend not in dispatch.BACKENDS:
            raise CkaqadError(f"--backend must be one of {', '.join(dispatch.BACKENDS)}, not {self.backend!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise CkaqadError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise CkaqadError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.backend == "triton" and device.type != "cuda" and not dispatch.triton_interpreted():
            raise CkaqadError("--backend triton needs --device cuda (Triton kernels run on the GPU)")
        if self.backend == "c" and device.type != "cpu":
            raise CkaqadError(f"--backend c runs on the CPU; it cannot quantize on --device {self.device}")
        if self.backend == "c" and not nvfp4_cpu.available():
            raise CkaqadError(f"--backend c: the C kernel is not available ({nvfp4_cpu.unavailable_reason()})")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CkaqadError(f"--device {self.device}: no CUDA device is available")
        parse_size(self.max_shard_size)


# -- source and recipe -----------------------------------------------------------------------------------------


def resolve_source(cfg: PackConfig, run: RunDir | None) -> Path:
    if cfg.model is not None:
        return Path(cfg.model)
    student = run.stage_output("distill", "student") if run is not None else None
    if student is None:
        where = f"run {run.path}" if run is not None else "no run"
        raise CkaqadError(f"{where} has no finished distill stage: run `ckaqad distill` first, or pass --model PATH")
    return Path(student)


def check_output(target: Path, source: Path, force: bool) -> None:
    """The output may not hold the source, and ``--force`` replaces only an earlier output of ckaqad's."""
    if target.resolve() == source.resolve() or target.resolve() in source.resolve().parents:
        raise CkaqadError(f"output {target} would replace the model it is packed from ({source}); choose another --out")
    check_target(target, force)


def check_target(target: Path, force: bool) -> None:
    """An existing output needs ``--force``, and then must be one of ckaqad's own."""
    if target.exists() and not force:
        raise CkaqadError(f"output {target} exists; pass --force to replace it")
    check_replaceable(target)


def check_source(source: Path) -> None:
    """The source must be a local model directory with a config.json (checked before anything is recorded)."""
    if not source.is_dir():
        raise CkaqadError(f"model {source} is not a directory: give --model a local Hugging Face model directory")
    if not (source / "config.json").is_file():
        raise CkaqadError(f"model {source} has no config.json: give --model a local Hugging Face model directory")


def _calibration_source(cfg: PackConfig, run: RunDir | None) -> str:
    if cfg.calib_data is not None:
        return cfg.calib_data
    entry = run.stage_entry("distill") if run is not None else None
    return str(((entry or {}).get("config") or {}).get("data") or "builtin")


# -- the stage -------------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    out: Path
    format: str
    scheme: str
    summary: dict[str, Any]


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _output_dir(target: Path, force: bool) -> Iterator[Path]:
    check_target(target, force)  # again: the target may have appeared while the model was calibrated
    with atomic_directory(target, overwrite=force) as tmp:
        yield tmp


def pack_model(cfg: PackConfig, *, run: RunDir | None = None, out: Path | None = None) -> PackResult:
    """Pack ``cfg``'s source into ``out`` (default: cfg.out, else RUN/pack/model); no run.json record."""
    start = time.perf_counter()
    source = resolve_source(cfg, run)
    target = Path(cfg.out) if cfg.out else out
    if target is None:
        raise CkaqadError("no output directory: pass --out DIR or --run DIR")
    fmt = formats.format_module(cfg.format)
    check_output(target, source, cfg.force)
    with SafetensorsSource(source) as src:
        config = formats.read_config(source)
        recipe = build_recipe(source, config, cfg.scheme, list(cfg.exclude), src)
        verify = cfg.verify if cfg.verify is not None else src.total_bytes <= AUTO_VERIFY_MAX_BYTES
        input_amax: dict[str, float] = {}
        fallbacks: dict[str, str] = {}
        if recipe.scheme == "w4a4":
            recorded = dict(recipe.input_amax)
            if not recorded:
                student, tokenizer = load_student(source, recipe, cfg.device)
                data = _calibration_source(cfg, run)
                recorded = calibrate_input_amax(
                    student, tokenizer, data, cfg.calib_tokens, cfg.calib_seq_len, cfg.device
                )
                del student
            input_amax, fallbacks = fill_input_amax(recipe.quantized, recorded)
        plan = plan_pack(source, src, config, recipe, fmt, input_amax, fallbacks, deploy_dtype(cfg.dtype, source, config))
        shard_bytes = parse_size(cfg.max_shard_size)
        planned = ShardedWriter(target, plan.specs, shard_bytes).file_bytes  # plans only, writes nothing
        extra = sum((source / n).stat().st_size for n in COPIED_FILES if (source / n).is_file())
        ensure_disk_space(target, planned + extra)
        kernel = kernel_description(plan, src, cfg.backend, cfg.device)
        with _output_dir(target, cfg.force) as tmp:
            writer = ShardedWriter(tmp, plan.specs, shard_bytes)
            try:
                write_tensors(plan, src, writer, cfg.backend, cfg.device)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            write_configs(plan, tmp)
            copied = copy_files(source, tmp, COPIED_FILES)
            verification: dict[str, Any] = {}
            if verify:
                verification["weights"] = verify_weights(plan, src, tmp)
                exact = not verification["weights"]["reciprocal_scale_inexact"]
                verification["logits"] = verify_logits(plan, tmp, cfg.device, weights_exact=exact)
                raise_if_failed(verification)
            _write_card(tmp, target, run, plan)
    summary = {
        "source": str(source),
        "out": str(target),
        "format": fmt.NAME,
        "scheme": plan.scheme,
        "modules_quantized": len(plan.shapes),
        "modules_kept": len(plan.kept),
        "kept": plan.kept,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "fused_groups": sum(1 for g in plan.groups if len(g) > 1),
        "input_scale_fallbacks": plan.input_fallbacks,
        "bytes_before": src.total_bytes,
        "bytes_after": writer.file_bytes,
        "compression_ratio": src.total_bytes / max(writer.file_bytes, 1),
        "shards": len(writer.shards),
        "kernel": kernel,
        "copied": copied,
        "verify": verification or None,
        "seconds": time.perf_counter() - start,
    }
    return PackResult(out=target, format=fmt.NAME, scheme=plan.scheme, summary=summary)




def _write_card(folder: Path, target: Path, run: RunDir | None, plan: PackPlan) -> None:
    """The model card, written into the temporary ``folder`` and naming the model by its final path ``target``."""
    from ckaqad_cli.card import CARD_FILE, base_model_from_manifest, render_model_card

    manifest = run.read() if run is not None else None
    student = run.stage_output("distill", "student") if run is not None else None
    if manifest and not (isinstance(student, Path) and student.resolve() == plan.source.resolve()):
        # not the run's distilled student (pack --model PATH in a run): its distill record describes another model
        manifest = {**manifest, "stages": {k: v for k, v in manifest["stages"].items() if k != "distill"}}
    base = (base_model_from_manifest(manifest) if manifest else None) or str(plan.source)
    text = render_model_card(folder, manifest=manifest, base_model=base, fmt=plan.fmt.NAME, scheme=plan.scheme,
                             model_path=target.resolve())
    atomic_write_text(folder / CARD_FILE, text)


SUMMARY_ROWS = (
    ("modules quantized", "modules_quantized"),
    ("modules kept", "modules_kept"),
    ("unquantized tensors in", "dtype"),
    ("fused groups", "fused_groups"),
    ("input scale fallbacks", "input_scale_fallbacks"),
    ("bytes before", "bytes_before"),
    ("bytes after", "bytes_after"),
    ("compression ratio", "compression_ratio"),
    ("shards", "shards"),
    ("quantized by", "kernel"),
    ("time (s)", "seconds"),
)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for label, key in SUMMARY_ROWS:
        value = summary[key]
        if key.startswith("bytes"):
            value = format_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, dict):
            value = str(len(value))
        rows.append((label, str(value)))
    verify = summary.get("verify")
    if verify:
        w, lg = verify["weights"], verify["logits"]
        inexact = len(w["reciprocal_scale_inexact"])
        note = f" ({inexact} within 1 ulp: reciprocal scale)" if inexact else ""
        rows.append(("verify weights", f"{w['bit_exact']}/{w['modules']} bit-exact{note}"))
        rows.append(("verify logits", f"ckaqad unpacker: max |diff| {lg['max_abs_diff']:.4g}, top-1 "
                                      f"{lg['top1_agreement']:.3f} ({lg['tolerance']})"))
        if "transformers" in lg:
            t = lg["transformers"]
            w4a4 = (f"; W4A4 top-1 {t['top1_agreement']:.3f}, not gated (compressed-tensors computes activation "
                    "scales in bf16)") if summary["scheme"] == "w4a4" else ""
            rows.append(("verify transformers", f"weights-only max |diff| {t['weights_only_max_abs_diff']:.4g}{w4a4}"))
    else:
        rows.append(("verify", "skipped"))
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# pack: {summary['format']} {summary['scheme']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(summary)]
    if summary["kept"]:
        lines += ["", "Kept in high precision:", ""] + [f"- `{m}`: {why}" for m, why in sorted(summary["kept"].items())]
    if summary["input_scale_fallbacks"]:
        lines += ["", "Input scales not calibrated directly:", ""]
        lines += [f"- `{m}`: {how}" for m, how in sorted(summary["input_scale_fallbacks"].items())]
    return "\n".join(lines) + "\n"


def run_pack(cfg: PackConfig, run: RunDir) -> PackResult:
    """The pack stage of a run: pack, record outputs/metrics in run.json, write pack/summary.json and summary.md."""
    source = resolve_source(cfg, run)
    out = Path(cfg.out) if cfg.out else run.stage_dir(STAGE) / OUTPUT_DIR
    check_source(source)  # argument checks before the run is touched: a bad --model leaves a finished pack alone
    ensure_writable(run.path, "--run")  # before anything loads: a read-only place is one line naming it
    ensure_writable(out, "--out" if cfg.out else "--run", replaced=True)
    if cfg.force:  # (without it, a finished stage is refused first, below)
        check_output(out, source, force=True)
    inputs = {"model": describe_input(source)}
    with run.stage(STAGE, config=asdict(cfg), inputs=inputs, force=cfg.force, atomic_outputs=True) as rec:
        result = pack_model(cfg, run=run, out=out)
        s = result.summary
        rec.outputs.update(model=run.relpath(out), format=result.format, scheme=result.scheme, files=_files(out))
        rec.metrics.update(
            {k: s[k] for k in ("modules_quantized", "modules_kept", "bytes_before", "bytes_after", "seconds")}
        )
        rec.metrics["compression_ratio"] = s["compression_ratio"]
        rec.metrics["input_scale_fallbacks"] = len(s["input_scale_fallbacks"])
        if s["verify"]:
            rec.metrics["verify"] = {
                "path": s["verify"]["logits"]["path"],
                "max_abs_diff": s["verify"]["logits"]["max_abs_diff"],
                "top1_agreement": s["verify"]["logits"]["top1_agreement"],
                "weights_bit_exact": s["verify"]["weights"]["bit_exact"],
                "weights_reciprocal_inexact": len(s["verify"]["weights"]["reciprocal_scale_inexact"]),
            }
            if "transformers" in s["verify"]["logits"]:
                rec.metrics["verify"]["transformers"] = s["verify"]["logits"]["transformers"]
        atomic_write_json(run.stage_dir(STAGE) / "summary.json", s)
        atomic_write_text(run.stage_dir(STAGE) / "summary.md", summary_markdown(s))
    return result
