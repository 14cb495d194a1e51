"""The model card (README.md) of a packed NVFP4 model: YAML metadata through huggingface_hub's ModelCardData, and a
body built from the run's manifest (how the model was made, the diagnose numbers, how to serve and load it).

Our parts of the body sit between ``<!-- ckaqad:begin NAME -->`` / ``<!-- ckaqad:end NAME -->`` markers, so that
``mode="merge"`` can refresh them while keeping everything a user wrote around them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ckaqad_cli import formats, units
from ckaqad_cli.atomic import atomic_write_bytes
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.records import DiagnoseRecord, DistillRecord, LinearPrecision, PackRecord
from ckaqad_cli.settings import BUILTIN, BUILTIN_REASONER
from ckaqad_cli.settings.push import CARD_MODES, CardMode

CARD_FILE = "README.md"
PLOT_FILE = "cka_per_layer.png"
SECTIONS = ("summary", "method", "evaluation", "usage")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# The usage snippets' prompt: one the model answers. The built-in teachers know only their task families: for
# `builtin` a list_ops problem (a family it and its NVFP4 students answer 100%) that gives "[1,3,8]"; for
# `builtin-reasoner` a multiplication (its strongest family, 95%+), answered with the partial products and "#1786".
BUILTIN_PROMPTS = {BUILTIN: "sorted([3,8,1])=", BUILTIN_REASONER: "47*38="}
GENERIC_PROMPT = "The capital of France is"


def _begin(name: str) -> str:
    return f"<!-- ckaqad:begin {name} -->"


def _end(name: str) -> str:
    return f"<!-- ckaqad:end {name} -->"


def is_hub_id(value: str | None) -> bool:
    """True for an ``org/name`` string that is not an existing local path."""
    return bool(value) and bool(_HUB_ID.match(str(value))) and not Path(str(value)).exists()


def base_model_license(base_model: str | None) -> str | None:
    """The license in the base model's own card, when it is at hand offline (a local dir or the HF cache)."""
    if not base_model:
        return None
    readme: Path | None = Path(base_model) / CARD_FILE
    if not readme.is_file():
        readme = None
        if is_hub_id(base_model):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, CARD_FILE)
            readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None
    try:
        return ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.get("license")
    except (OSError, ValueError):
        return None


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _pipeline_tag(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures") or []
    return "text-generation" if any(str(a).endswith("ForCausalLM") for a in archs) else None


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _method(distill: DistillRecord | None) -> str:
    """"ptq" (the run has no distill stage), "qad" (distilled with lambda 0: KL only) or "cka-qad"."""
    if distill is None:
        return "ptq"
    return "qad" if distill.kl_only else "cka-qad"


HOW_MADE = {
    "ptq": "made by post-training quantization (PTQ) of the BF16 model, without distillation",
    "qad": "made with quantization-aware distillation (QAD) from the BF16 teacher, on the KL divergence alone",
    "cka-qad": "made with **CKA-QAD**: quantization-aware distillation from the BF16 teacher with a CKA term that "
    "keeps the student's layer representations aligned with the teacher's",
}


def _precision_text(precision: LinearPrecision, scheme: str) -> str:
    fp8 = (f"{precision.fp8} in FP8 (E4M3 weights with one scale per output channel"
           + (", inputs quantized per token on the fly)" if scheme == "w4a4" else ")"))
    parts = [f"{precision.nvfp4} in NVFP4", *([fp8] if precision.fp8 else []), f"{precision.kept} kept unquantized"]
    return (f"Linear layers: {', '.join(parts)}; **{precision.bits:.4f} bits per Linear weight** as written (NVFP4 "
            "counted as 4.5 bits, FP8 as 8 plus its scales, 16-bit as 16: how `ckaqad plan` counts a bit budget).")


def _section_summary(title: str, base_model: str | None, fmt: str, scheme: str, method: str,
                     precision: LinearPrecision | None) -> str:
    base = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else f"`{base_model}`"
    acts = (
        "The inputs of those layers are quantized the same way on the fly (W4A4)."
        if scheme == "w4a4"
        else "Activations stay in 16-bit (W4A16)."
    )
    lines = [
        f"# {title}",
        "",
        f"An NVFP4 ({scheme.upper()}) quantization of {base if base_model else 'a BF16 model'}, "
        f"stored in the **{fmt}** format and {HOW_MADE[method]}.",
        "",
        "**NVFP4** stores the weights of the linear layers as 4-bit floats (E2M1: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 "
        "with a sign) in blocks of 16 elements; each block has an FP8 (E4M3) scale and each tensor a float32 global "
        f"scale. {acts} Layers the recipe leaves out (by default the embeddings, the output head, norms and MoE "
        "routers) stay in BF16. NVFP4 matrix multiplies run natively on NVIDIA Blackwell GPUs.",
    ]
    if precision is not None:
        lines += ["", _precision_text(precision, scheme)]
    return "\n".join(lines)


def _lambda_text(distill: DistillRecord) -> str | None:
    mean = distill.mean_lambda_cka
    if distill.lambda_cka is not None:
        return format(distill.lambda_cka, "g")
    if distill.cka_balance is not None:
        tail = f", mean {mean:.4g}" if isinstance(mean, (int, float)) else ""
        return f"balanced each step to {distill.cka_balance:g} x KL / CKA term{tail}"
    return None if mean is None else format(mean, ".4g")


def _section_method(manifest: dict | None, scheme: str) -> str:
    distill = DistillRecord.of(manifest)
    lines = ["## How it was made", ""]
    if distill is None:
        lines.append("The run that produced this model recorded no distillation stage (post-training quantization).")
        pack = PackRecord.of(manifest)
        if pack is not None and pack.scale_rule is not None:
            lines += ["", f"Weight block scales: the `{pack.scale_rule}` rule (ckaqad's docs/nvfp4.md)."]
        return "\n".join(lines)
    rows = [
        ("teacher", distill.teacher),
        ("scheme", distill.scheme),
        ("weight scale rule", distill.scale_rule),
        ("activation arithmetic", distill.activation_arithmetic if distill.scheme == "w4a4" else None),
        ("data", distill.data),
        ("tokens seen", distill.tokens_seen),
        ("steps", distill.steps),
        ("CKA weight (lambda)", _lambda_text(distill)),
        ("learning rate", distill.lr),
        ("sequence length", distill.seq_len),
    ]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {units.fmt(v, thousands=True)} |" for k, v in rows if v is not None]
    lines += [
        "",
        "Loss: KL divergence from the BF16 teacher's next-token distribution"
        + (" (lambda 0: no CKA term); " if distill.kl_only else
           " plus lambda times the mean over layers of (1 - linear CKA) between the student's and the teacher's "
           "hidden states; ")
        + ("weights and activations are" if scheme == "w4a4" else "weights are")
        + " fake-quantized to NVFP4 in the forward pass, with a straight-through estimator for the gradients.",
    ]
    return "\n".join(lines)


def _section_evaluation(manifest: dict | None, has_plot: bool) -> str:
    diagnose = DiagnoseRecord.of(manifest)
    results = diagnose.students if diagnose is not None else {}
    lines = ["## Evaluation against the BF16 teacher", ""]
    if not results:
        lines.append("No diagnose numbers were recorded for this run (`ckaqad diagnose` measures them).")
    else:
        with_acc = any(m.get("task_acc") is not None for m in results.values())
        lines += [
            "Layer CKA compares each decoder layer's hidden states with the teacher's (1 = same geometry); KL is the "
            "mean token KL divergence from the teacher; top-1 is next-token agreement with the teacher.",
            "",
            "| model | mean layer CKA | min layer CKA | KL | top-1 agreement |"
            + (" task accuracy |" if with_acc else ""),
            "|---|---|---|---|---|" + ("---|" if with_acc else ""),
        ]
        for label, m in results.items():
            row = [label, *(units.fmt(m.get(key), none="n/a") for key in ("mean_cka", "min_cka", "kl"))]
            row.append(_pct(m.get("top1")))
            if with_acc:
                row.append(_pct(m.get("task_acc")))
            lines.append("| " + " | ".join(row) + " |")
    if has_plot:
        lines += ["", f"![CKA per layer against the BF16 teacher]({PLOT_FILE})"]
    return "\n".join(lines)


def builtin_name(base_model: str | None) -> str | None:
    """The name of the built-in teacher ``base_model`` is, by name or by its directory; None for any other model."""
    if not base_model:
        return None
    from ckaqad_cli.builtin import TEACHER_DIRS

    return next((name for name, directory in TEACHER_DIRS.items()
                 if base_model == name or Path(base_model).resolve() == directory.resolve()), None)


def _section_usage(model_ref: str, fmt: str, prompt: str, placeholder: bool) -> str:
    lines = [
        "## Usage",
        "",
        *([f"`{model_ref}` is this folder: run the snippets from the folder above it, or use the model's Hub id once "
           "it is pushed (`ckaqad push`).", ""] if placeholder else []),
        "Serve with [vLLM](https://docs.vllm.ai):",
        "",
        "```bash",
        f"vllm serve {model_ref}",
        "```",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM(model="{model_ref}")',
        f'print(llm.generate([{json.dumps(prompt)}], SamplingParams(max_tokens=32))[0].outputs[0].text)',
        "```",
        "",
    ]
    needs = formats.format_module(fmt).TRANSFORMERS_LIBRARY
    if needs is not None:
        lines += [
            f"Load with transformers (`pip install {needs.replace('_', '-')}`; load in bfloat16):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{model_ref}")',
            f'model = AutoModelForCausalLM.from_pretrained("{model_ref}", dtype="bfloat16", device_map="auto")',
            f'inputs = tokenizer({json.dumps(prompt)}, return_tensors="pt").to(model.device)',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
            "```",
        ]
    else:
        lines += [
            "transformers does not load pre-quantized ModelOpt NVFP4 checkpoints; serve it with vLLM or TensorRT-LLM, "
            "or load a dequantized BF16 copy with ckaqad:",
            "",
            "```python",
            *([] if placeholder else ["from huggingface_hub import snapshot_download"]),
            "from ckaqad_cli.models import load_model",
            "",
            f'model, tokenizer = load_model("{model_ref}")' if placeholder else
            f'model, tokenizer = load_model(snapshot_download("{model_ref}"))',
            "```",
        ]
    return "\n".join(lines)


def _metadata(folder: Path, base_model: str | None, fmt: str, method: str, fp8: bool) -> dict[str, Any]:
    data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        base_model_relation="quantized" if is_hub_id(base_model) else None,
        library_name=formats.format_module(fmt).LIBRARY,
        pipeline_tag=_pipeline_tag(_read_config(folder)),
        license=base_model_license(base_model),
        tags=["nvfp4", *(["fp8"] if fp8 else []), method, fmt],
    )
    return data.to_dict()


def _wrap(name: str, body: str) -> str:
    return f"{_begin(name)}\n{body}\n{_end(name)}"


def _merge_metadata(existing: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Ours wins for the fields we own; the user's license / pipeline tag and any other key are kept."""
    merged = dict(existing)
    for key, value in ours.items():
        if key == "tags":  # the method and fp8 tags are ours: an earlier card's give way
            kept = [t for t in existing.get("tags") or [] if t not in (*HOW_MADE, "fp8") or t in value]
            merged["tags"] = list(dict.fromkeys([*kept, *value]))
        elif key in ("license", "pipeline_tag") and existing.get(key):
            continue
        else:
            merged[key] = value
    return merged


def _merge_body(existing: str, sections: dict[str, str]) -> str:
    body = existing.rstrip("\n")
    for name, text in sections.items():
        pattern = re.compile(re.escape(_begin(name)) + r".*?" + re.escape(_end(name)), re.DOTALL)
        if pattern.search(body):
            body = pattern.sub(lambda _m, t=text: _wrap(name, t), body, count=1)
        else:
            body = f"{body}\n\n{_wrap(name, text)}" if body.strip() else _wrap(name, text)
    return body


def _compose(metadata: dict[str, Any], body: str) -> str:
    yaml_text = ModelCardData(**metadata).to_yaml() if metadata else ""
    head = f"---\n{yaml_text}\n---\n\n" if yaml_text else ""
    return f"{head}{body.strip()}\n"


def render_model_card(
    folder: str | Path,
    *,
    manifest: dict | None,
    base_model: str | None,
    fmt: str,
    scheme: str,
    existing: str | None = None,
    mode: CardMode = "replace",
    repo_id: str | None = None,
    model_path: str | Path | None = None,
    with_plot: bool | None = None,
    precision: LinearPrecision | None = None,
) -> str:
    """README.md text for the packed model in ``folder``.

    ``existing`` is the card already there: ``keep`` returns it unchanged, ``replace`` ignores it, ``merge`` keeps its
    prose and metadata and refreshes our marked sections and fields. ``repo_id`` names the model in the usage
    snippets; without it, a relative placeholder does, ``./NAME`` with the name of ``model_path`` (the folder's final
    path, when the card is written into a temporary folder that is renamed afterwards), else of ``folder``: never an
    absolute local path, which means nothing on another machine. The snippets' prompt is one the model answers: a
    task problem for the built-in teacher, a plain sentence to complete for any other model. The card shows
    ``cka_per_layer.png`` when ``with_plot`` is true (default: when ``folder`` holds that file; :func:`copy_plot` puts
    it there). ``precision`` (how pack wrote the Linear weights) adds their formats and bits per weight to the summary.
    """
    if mode not in CARD_MODES:
        raise CkaqadError(f"card mode {mode!r} is not one of {', '.join(CARD_MODES)}")
    folder = Path(folder)
    if mode == "keep" and existing is not None:
        return existing
    title_base = (base_model or "model").rstrip("/").split("/")[-1]
    title = repo_id.split("/")[-1] if repo_id else f"{title_base}-NVFP4"
    method = _method(DistillRecord.of(manifest))
    sections = {
        "summary": _section_summary(title, base_model, fmt, scheme, method, precision),
        "method": _section_method(manifest, scheme),
        "evaluation": _section_evaluation(
            manifest, (folder / PLOT_FILE).is_file() if with_plot is None else with_plot
        ),
        "usage": _section_usage(repo_id or f"./{Path(model_path or folder).name}", fmt,
                                BUILTIN_PROMPTS.get(builtin_name(base_model), GENERIC_PROMPT),
                                placeholder=not repo_id),
    }
    ours = _metadata(folder, base_model, fmt, method, bool(precision and precision.fp8))
    if mode == "merge" and existing is not None:
        card = ModelCard(existing, ignore_metadata_errors=True)
        return _compose(_merge_metadata(card.data.to_dict(), ours), _merge_body(card.text, sections))
    return _compose(ours, "\n\n".join(_wrap(name, sections[name]) for name in SECTIONS))


def copy_plot(plot: Path | None, folder: Path) -> bool:
    """Copy the run's CKA plot into ``folder`` so the card can show it; False when there is none."""
    if plot is None or not Path(plot).is_file():
        return False
    atomic_write_bytes(Path(folder) / PLOT_FILE, Path(plot).read_bytes())
    return True


def base_model_from_manifest(manifest: dict[str, Any]) -> str | None:
    """The teacher of the run: a Hub id when it was given as one, else the path or name it was given as."""
    for record in (DistillRecord.of(manifest), DiagnoseRecord.of(manifest)):
        if record is None:
            continue
        given = record.teacher_input
        if given:
            return given.get("hub_id") or given.get("path") or given.get("builtin")
        if record.teacher:
            return str(record.teacher)
    return None
