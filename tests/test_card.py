"""The model card: YAML metadata that parses back with the Hub fields, the run's numbers in the body, and a merge that
keeps what a user wrote."""

from __future__ import annotations

import json
import re

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from huggingface_hub import constants as hf_constants

from ckaqad_cli.card import PLOT_FILE, render_model_card
from ckaqad_cli.records import LinearPrecision

MANIFEST = {
    "schema_version": 1,
    "stages": {
        "distill": {
            "status": "done",
            "config": {"teacher": "org/base-4b", "lambda_cka": None, "cka_balance": 1.0, "lr": 1e-5, "seq_len": 512},
            "metrics": {"steps": 1200, "tokens_seen": 4915200, "mean_lambda_cka": 0.0371},
        },
        "diagnose": {
            "status": "done",
            "metrics": {
                "kl-only": {"mean_cka": 0.9612, "min_cka": 0.9011, "kl": 0.0456, "top1": 0.871},
                "cka-qad": {"mean_cka": 0.9934, "min_cka": 0.9802, "kl": 0.0398, "top1": 0.894, "task_acc": 0.62},
            },
        },
    },
}


def _folder(tmp_path, *, plot: bool = False):
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "compressed-tensors"}}
    (folder / "config.json").write_text(json.dumps(config))
    if plot:
        (folder / PLOT_FILE).write_bytes(b"png")
    return folder


def _split(card: str) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.DOTALL)
    assert m, card[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def _render(folder, **kw):
    args = dict(manifest=MANIFEST, base_model="org/base-4b", fmt="compressed-tensors", scheme="w4a4")
    return render_model_card(folder, **{**args, **kw})


def test_metadata_parses_back_with_the_hub_fields(tmp_path):
    meta, body = _split(_render(_folder(tmp_path), repo_id="me/base-4b-nvfp4"))
    assert meta["base_model"] == "org/base-4b"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"nvfp4", "cka-qad", "compressed-tensors"} <= set(meta["tags"])
    assert "license" not in meta  # the base model's card is not at hand offline
    assert "# base-4b-nvfp4" in body


def test_license_comes_from_the_cached_base_model_card(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--base-4b" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    (cache / "models--org--base-4b" / "refs").mkdir()
    (cache / "models--org--base-4b" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    meta, _ = _split(_render(_folder(tmp_path)))
    assert meta["license"] == "apache-2.0"


def test_local_base_model_is_named_in_the_body_not_the_metadata(tmp_path):
    base = tmp_path / "teacher"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\nteacher\n")
    meta, body = _split(_render(_folder(tmp_path), base_model=str(base)))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["license"] == "mit"
    assert str(base) in body


def test_body_has_the_run_numbers_both_variants_plot_and_snippets(tmp_path):
    _, body = _split(_render(_folder(tmp_path, plot=True), repo_id="me/m"))
    assert "| tokens seen | 4,915,200 |" in body and "| steps | 1,200 |" in body
    assert "balanced each step to 1 x KL / CKA term, mean 0.0371" in body
    kl_row = next(line for line in body.splitlines() if line.startswith("| kl-only |"))
    cka_row = next(line for line in body.splitlines() if line.startswith("| cka-qad |"))
    assert "0.9612" in kl_row and "0.9011" in kl_row and "87.1%" in kl_row
    assert "0.9934" in cka_row and "0.9802" in cka_row and "89.4%" in cka_row and "62.0%" in cka_row
    assert f"]({PLOT_FILE})" in body
    assert "vllm serve me/m" in body and 'AutoModelForCausalLM.from_pretrained("me/m"' in body
    assert "E2M1" in body


def test_no_plot_line_without_a_plot_and_modelopt_snippet(tmp_path):
    _, body = _split(_render(_folder(tmp_path), fmt="modelopt", repo_id="me/m"))
    assert PLOT_FILE not in body
    assert "load_model(snapshot_download(\"me/m\"))" in body
    assert "AutoModelForCausalLM" not in body


def _user_edit(card: str) -> str:
    meta, body = _split(card)
    meta["license"] = "other"
    meta["tags"].append("my-tag")
    meta["language"] = ["en"]
    body = "My own introduction, which must survive.\n\n" + body
    body = body.replace("<!-- ckaqad:begin usage -->", "A note between sections.\n\n<!-- ckaqad:begin usage -->")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body + "\nMy closing words.\n"


def test_merge_keeps_user_prose_and_metadata_and_refreshes_our_sections(tmp_path):
    folder = _folder(tmp_path)
    edited = _user_edit(_render(folder, repo_id="me/m"))
    newer = json.loads(json.dumps(MANIFEST))
    newer["stages"]["diagnose"]["metrics"]["cka-qad"]["mean_cka"] = 0.9977
    merged = _render(folder, repo_id="me/m", manifest=newer, existing=edited, mode="merge")
    meta, body = _split(merged)
    for prose in ("My own introduction, which must survive.", "A note between sections.", "My closing words."):
        assert body.count(prose) == 1
    assert "0.9977" in body and "0.9934" not in body
    assert meta["license"] == "other" and meta["language"] == ["en"]
    assert "my-tag" in meta["tags"] and "nvfp4" in meta["tags"]
    assert meta["base_model_relation"] == "quantized"
    for name in ("summary", "method", "evaluation", "usage"):
        assert body.count(f"<!-- ckaqad:begin {name} -->") == 1


def test_keep_and_replace(tmp_path):
    folder = _folder(tmp_path)
    edited = _user_edit(_render(folder))
    assert _render(folder, existing=edited, mode="keep") == edited
    replaced = _render(folder, existing=edited, mode="replace")
    assert "My own introduction" not in replaced and "my-tag" not in replaced


def test_merge_into_a_hand_written_card_appends_our_sections(tmp_path):
    existing = "---\nlicense: cc-by-4.0\n---\n# My model\n\nHand-written description.\n"
    meta, body = _split(_render(_folder(tmp_path), existing=existing, mode="merge"))
    assert body.lstrip().startswith("# My model\n\nHand-written description.")
    assert meta["license"] == "cc-by-4.0" and meta["base_model"] == "org/base-4b"
    assert "## Evaluation against the BF16 teacher" in body


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prose=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=80))
def test_merge_is_idempotent_and_keeps_arbitrary_prose(tmp_path, prose):
    prose = prose.strip().replace("<!--", "") or "x"
    folder = tmp_path / "model"
    if not folder.exists():
        _folder(tmp_path)
    existing = f"{prose}\n\n" + _render(folder).split("---\n", 2)[2]
    once = _render(folder, existing=existing, mode="merge")
    assert prose in once
    assert _render(folder, existing=once, mode="merge") == once


def test_the_card_names_the_method_the_run_used(tmp_path):
    """PTQ (no distill stage), KL-only QAD (lambda 0) and CKA-QAD each get their own words and tag."""
    folder = _folder(tmp_path)
    ptq = {"schema_version": 1, "stages": {}}
    kl_only = {"schema_version": 1, "stages": {"distill": {**MANIFEST["stages"]["distill"],
                                                           "config": {"lambda_cka": 0.0}}}}
    cards = {name: _split(_render(folder, manifest=m)) for name, m in
             [("ptq", ptq), ("qad", kl_only), ("cka-qad", MANIFEST)]}
    for name, (meta, _) in cards.items():
        assert name in meta["tags"] and not {"ptq", "qad", "cka-qad"} - {name} & set(meta["tags"])
    assert "post-training quantization" in cards["ptq"][1] and "CKA-QAD" not in cards["ptq"][1]
    assert "KL divergence alone" in cards["qad"][1] and "no CKA term" in cards["qad"][1]
    assert "CKA-QAD" not in cards["qad"][1]
    assert "**CKA-QAD**" in cards["cka-qad"][1] and "(1 - linear CKA)" in cards["cka-qad"][1]
    # merged over a card of another method (an earlier push), the old method tag gives way; the user's stay
    existing = _render(folder).replace("- nvfp4", "- nvfp4\n- my-tag", 1)
    meta, _ = _split(_render(folder, manifest=ptq, existing=existing, mode="merge"))
    assert "ptq" in meta["tags"] and "cka-qad" not in meta["tags"] and "my-tag" in meta["tags"]


def test_usage_names_the_hub_id_or_a_relative_placeholder_never_a_local_path(tmp_path):
    folder = _folder(tmp_path)
    for fmt in ("compressed-tensors", "modelopt"):
        _, body = _split(_render(folder, fmt=fmt, model_path="/models/qwen3-nvfp4"))
        usage = body.split("<!-- ckaqad:begin usage -->")[1]
        assert "/models/" not in body and str(tmp_path) not in body
        assert 'LLM(model="./qwen3-nvfp4")' in usage and "vllm serve ./qwen3-nvfp4" in usage  # the final name
        assert "snapshot_download" not in usage  # a local folder is loaded as it is
        _, body = _split(_render(folder, fmt=fmt))
        assert "vllm serve ./model" in body and str(tmp_path) not in body
    _, body = _split(_render(folder, repo_id="me/m", model_path="/models/qwen3-nvfp4"))
    assert "vllm serve me/m" in body and "/models/qwen3-nvfp4" not in body and "./" not in body


def _usage_prompts(body: str) -> set[str]:
    return set(re.findall(r'(?:generate\(\[|tokenizer\()"([^"]*)"', body))


def _one_usage_prompt(folder, bases: tuple[str, ...]) -> str:
    """The usage prompt of the cards rendered for each of ``bases`` (a name and a directory): one and the same."""
    prompts = set()
    for base in bases:
        _, body = _split(_render(folder, base_model=base, repo_id="me/m"))
        prompts |= _usage_prompts(body)
    assert len(prompts) == 1
    return prompts.pop()


def test_usage_prompt_is_one_the_model_answers(tmp_path):
    """The built-in teacher knows only its task families: its card asks it a task problem it answers; any other
    model gets a plain sentence to complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckaqad_cli.builtin import TEACHER_DIR
    from ckaqad_cli.builtin.tasks import greedy_answers

    folder = _folder(tmp_path)
    _, body = _split(_render(folder, repo_id="me/m"))
    assert _usage_prompts(body) == {"The capital of France is"}
    prompt = _one_usage_prompt(folder, ("builtin", str(TEACHER_DIR)))
    assert re.fullmatch(r"sorted\(\[\d(,\d){2,4}\]\)=", prompt)  # a problem of the list_ops family (tasks.py)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(TEACHER_DIR), AutoTokenizer.from_pretrained(TEACHER_DIR)
    digits = [int(c) for c in re.findall(r"\d", prompt)]
    assert greedy_answers(model, tokenizer, [prompt]) == ["[" + ",".join(map(str, sorted(digits))) + "]"]


def test_reasoner_card_asks_a_multiplication_it_answers(tmp_path):
    """The built-in reasoner's card (by name or directory) asks a multiplication, and the reasoner's whole trace ends
    in the right product."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckaqad_cli.builtin import REASONER_DIR
    from ckaqad_cli.builtin.generation import decode
    from ckaqad_cli.builtin.reasoner_tasks import MAX_TRACE_CHARS, final_answer

    folder = _folder(tmp_path)
    prompt = _one_usage_prompt(folder, ("builtin-reasoner", str(REASONER_DIR)))
    a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=", prompt).groups())  # a problem of the multiplication family
    model = AutoModelForCausalLM.from_pretrained(REASONER_DIR, dtype=torch.bfloat16)
    reply = decode(model, AutoTokenizer.from_pretrained(REASONER_DIR), [prompt], max_new_tokens=MAX_TRACE_CHARS)[0]
    assert final_answer(reply) == str(a * b)


def test_the_summary_states_the_formats_and_bits_per_weight_pack_wrote(tmp_path):
    """With pack's precision the card counts the Linear layers per format and states their bits per weight; FP8
    layers get a sentence and a tag, which a merge drops again when a later pack has none."""
    folder = _folder(tmp_path)
    meta, body = _split(_render(folder, precision=LinearPrecision(nvfp4=40, fp8=5, kept=1, bits=4.94412)))
    assert "40 in NVFP4, 5 in FP8 (E4M3 weights with one scale per output channel, inputs quantized per token" in body
    assert "1 kept unquantized; **4.9441 bits per Linear weight**" in body and "fp8" in meta["tags"]
    _, w4a16 = _split(_render(folder, scheme="w4a16", precision=LinearPrecision(40, 5, 1, 4.9)))
    assert "output channel); **" not in w4a16 and "output channel), 1 kept" in w4a16
    merged_meta, merged = _split(_render(folder, existing=_render(folder, precision=LinearPrecision(40, 5, 1, 4.9)),
                                         mode="merge", precision=LinearPrecision(45, 0, 1, 4.6551)))
    assert "45 in NVFP4, 1 kept unquantized; **4.6551 bits" in merged and " in FP8" not in merged
    assert "fp8" not in merged_meta["tags"] and "nvfp4" in merged_meta["tags"]
    assert "bits per Linear weight" not in _split(_render(folder))[1]  # unknown (a folder pushed without its run)
