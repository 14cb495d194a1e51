"""The distill stage: layer selection, token sampling, the objective's terms, data order, crash/Ctrl-C/NaN
behaviour (real SIGKILL in a subprocess), the CLI on the built-in teacher, and the CKA-QAD gain."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from ckaqad_cli import checkpoints
from ckaqad_cli import distributed as D
from ckaqad_cli.app import app
from ckaqad_cli.cka import Standardizer, TokenFilter, cka_loss
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.models import decoder_layers
from ckaqad_cli.objective import (
    CausalLMBody,
    LayerTap,
    Objective,
    ObjectiveSettings,
    TeacherMemo,
    parse_layers,
    sample_positions,
)
from ckaqad_cli.settings.distill import BUILTIN_PRESET, REAL_MODEL_PRESET, DistillConfig
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.stages.distill import check_launch, run_distill, split_heldout, train
from ckaqad_cli.trainer import train_rows
from ckaqad_cli.training import NonFiniteLossError
from fixtures import tiny_models, tiny_sequences

WORKER = Path(__file__).parent.parent / "distill_worker.py"


# -- options ---------------------------------------------------------------------------------------------------
def test_parse_layers_forms():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("every:4", 28) == [3, 7, 11, 15, 19, 23, 27]
    assert parse_layers("every:2", 5) == [0, 2, 4]
    assert parse_layers("0,3,5-7", 10) == [0, 3, 5, 6, 7]
    assert parse_layers("-1,-3--2", 6) == [3, 4, 5]
    assert parse_layers("2:10:3", 12) == [2, 5, 8]
    for bad in ("every:0", "x", "0,99", "1:2:3:4", "5:5"):
        with pytest.raises(CkaqadError):
            parse_layers(bad, 6)


def test_presets_fill_unset_options_and_validate():
    builtin = DistillConfig().resolved()
    assert builtin.lr == BUILTIN_PRESET["lr"] and builtin.seq_len == BUILTIN_PRESET["seq_len"]
    assert builtin.data == "builtin"
    reasoner = DistillConfig(teacher="builtin-reasoner").resolved()  # longer sequences, the same tokens a step
    assert (reasoner.seq_len, reasoner.batch_size, reasoner.data) == (256, 16, "builtin-reasoner")
    assert reasoner.seq_len * reasoner.batch_size == builtin.seq_len * builtin.batch_size
    real = DistillConfig(teacher="Qwen/Qwen3-0.6B", steps=5).resolved()
    assert real.lr == 1e-5 == REAL_MODEL_PRESET["lr"] and real.steps == 5 and real.data == "builtin"
    with pytest.raises(CkaqadError, match="--scheme"):
        DistillConfig(scheme="w8a8").resolved()
    with pytest.raises(CkaqadError, match="--batch-size"):
        DistillConfig(batch_size=0).resolved()
    with pytest.raises(CkaqadError, match="--teacher-offload .*torchrun"):  # not under torchrun: refused up front
        check_launch(DistillConfig(teacher_offload=True))


# -- token sampling and data order -----------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), per_seq=st.integers(1, 12), rows=st.integers(1, 5))
def test_sample_positions_respects_filter_and_count(seed, per_seq, rows):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, 10, generator=gen) < 0.6
    r, c = sample_positions(keep, per_seq, torch.rand(rows, 10, generator=gen))
    assert keep[r, c].all()
    counts = torch.bincount(r, minlength=rows)
    assert torch.equal(counts, keep.sum(1).clamp(max=per_seq))
    assert len(set(zip(r.tolist(), c.tolist()))) == len(r)  # no position twice


def test_train_rows_cover_each_pass_and_depend_only_on_step():
    n, batch, accum = 10, 3, 2
    seen = torch.cat([train_rows(s, m, n_train=n, batch=batch, grad_accum=accum, seed=1)
                      for s in range(5) for m in range(accum)])
    assert sorted(seen[:n].tolist()) == list(range(n))  # the first pass is a permutation
    assert torch.equal(train_rows(3, 1, n_train=n, batch=batch, grad_accum=accum, seed=1), seen[21:24])
    assert not torch.equal(seen[:n], torch.cat([train_rows(s, m, n_train=n, batch=batch, grad_accum=accum, seed=2)
                                                for s in range(2) for m in range(accum)])[:n])


def test_heldout_is_disjoint_tail():
    seqs = torch.arange(40).view(20, 2)
    tr, ev = split_heldout(seqs, 4, 2)
    assert ev.shape[0] == 4 and torch.equal(ev, seqs[-4:]) and torch.equal(tr, seqs[:-4])
    with pytest.raises(CkaqadError, match="too few"):
        split_heldout(seqs[:2], 4, 2)


# -- the objective ---------------------------------------------------------------------------------------------
def _objective(models, standardizer=None, **kw):
    s = ObjectiveSettings(**{"cka_layers": (0, 1, 2), "cka_tokens": 24, **kw})
    return Objective(CausalLMBody(models.student), CausalLMBody(models.teacher), decoder_layers(models.student),
                     decoder_layers(models.teacher), s, D.DistContext(), bos_token_id=models.tokenizer.bos_token_id,
                     standardizer=standardizer)


def test_objective_terms_match_direct_computation():
    models = tiny_models()
    ids = tiny_sequences(4)
    scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    terms = _objective(models, cka_balance=0.5)(ids, slice(0, 4), scores)
    # the same tokens, computed without hooks: hidden_states[i + 1] is decoder layer i's output
    keep = TokenFilter().mask(ids, None, (), models.tokenizer.bos_token_id)
    r, c = sample_positions(keep, 6, scores)
    assert len(r) == 24 and (c > 0).all()
    s_out = models.student(ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = models.teacher(ids, output_hidden_states=True)
    expected_cka = cka_loss([s_out.hidden_states[i + 1][r, c] for i in range(3)],
                            [t_out.hidden_states[i + 1][r, c] for i in range(3)])
    p_t = t_out.logits.log_softmax(-1)
    expected_kl = (p_t.exp() * (p_t - s_out.logits.log_softmax(-1))).sum(-1).mean()
    assert terms.cka_term == pytest.approx(float(expected_cka.detach()), rel=1e-5)
    assert terms.kl == pytest.approx(float(expected_kl.detach()), rel=1e-5)
    assert terms.cka_term > 0 and terms.kl > 0
    # balanced lambda: the CKA part is cka_balance times the KL
    assert terms.lambda_cka * terms.cka_term == pytest.approx(0.5 * terms.kl, rel=1e-6)
    assert float(terms.loss.detach()) == pytest.approx(terms.kl * 1.5, rel=1e-5)


def test_lambda_zero_is_kl_only_and_fixed_lambda_is_used():
    models = tiny_models()
    ids = tiny_sequences(4)
    scores = torch.rand(ids.shape)
    kl_only = _objective(models, lambda_cka=0.0)(ids, slice(0, 4), scores)
    assert kl_only.cka_term is None and float(kl_only.loss.detach()) == pytest.approx(kl_only.kl)
    fixed = _objective(models, lambda_cka=2.0)(ids, slice(0, 4), scores)
    assert fixed.lambda_cka == 2.0
    assert float(fixed.loss.detach()) == pytest.approx(fixed.kl + 2.0 * fixed.cka_term, rel=1e-6)


def _layer_outputs(model, ids):
    """Decoder layers 0, 1, 2's outputs without hooks (hidden_states[i + 1]; the last entry is after the final norm)."""
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[1:4]


def _all_positions(models, ids, **filter_kw):
    """The (rows, cols) of every token a TokenFilter keeps, judged on layers 0-2 of the teacher."""
    hidden = _layer_outputs(models.teacher, ids)
    return TokenFilter(**filter_kw).mask(ids, None, hidden, models.tokenizer.bos_token_id).nonzero(as_tuple=True)


def _direct_cka_term(models, ids, rows, cols, scale=None):
    """mean over layers 0-2 of 1 - linear CKA at (rows, cols), computed without hooks; features times ``scale[i]``."""
    s_h, t_h = _layer_outputs(models.student, ids), _layer_outputs(models.teacher, ids)
    scale = scale or [1.0] * len(t_h)
    return float(cka_loss([h[rows, cols] * k for h, k in zip(s_h, scale)],
                          [h[rows, cols] * k for h, k in zip(t_h, scale)]))


def test_cka_drop_massive_leaves_a_planted_massive_token_out_of_the_cka_term():
    models = tiny_models()
    planted = 7
    ids = tiny_sequences(4)
    ids[ids == planted] = planted + 1
    ids[:, 5] = planted
    ids[2, 11] = planted
    with torch.no_grad():  # a huge embedding row: the token's residual stream is massive in every layer
        for model in (models.teacher, models.student):
            model.model.embed_tokens.weight[planted] *= 1e4
    everything = ids.numel()  # cka_tokens this large takes every kept position, whatever the scores
    scores = torch.rand(ids.shape)
    settings = {"cka_tokens": everything, "lambda_cka": 1.0}  # layers 0, 1, 2
    plain = _objective(models, **settings)(ids, slice(0, 4), scores)
    dropped = _objective(models, token_filter=TokenFilter(drop_massive=True), **settings)(ids, slice(0, 4), scores)
    rows, cols = _all_positions(models, ids, drop_massive=True)
    assert len(rows) == 4 * 23 - 5 and not (ids[rows, cols] == planted).any()  # exactly the planted tokens go
    assert dropped.cka_term == pytest.approx(_direct_cka_term(models, ids, rows, cols), rel=1e-5)
    assert plain.cka_term == pytest.approx(_direct_cka_term(models, ids, *_all_positions(models, ids)), rel=1e-5)
    assert plain.cka_term < 0.5 * dropped.cka_term  # the massive token made the layers look alike


def test_cka_standardize_scales_both_sides_by_the_teachers_feature_std():
    models = tiny_models()
    ids, held_out = tiny_sequences(4), tiny_sequences(4, seed=1)
    scores = torch.rand(ids.shape)
    settings = {"cka_tokens": ids.numel(), "lambda_cka": 1.0}  # layers 0, 1, 2
    plain = _objective(models, **settings)(ids, slice(0, 4), scores)
    objective = _objective(models, standardizer=Standardizer(), token_filter=TokenFilter(standardize=True),
                           **settings)
    objective.fit_standardizer(held_out)
    # the scales are 1 / std of the teacher's features on the held-out kept tokens (not the student's, not the batch's)
    r, c = _all_positions(models, held_out)
    inv_std = [1.0 / h[r, c].std(dim=0) for h in _layer_outputs(models.teacher, held_out)]
    for i in range(3):
        torch.testing.assert_close(objective.standardizer.inv_std[i], inv_std[i], rtol=1e-5, atol=0)
    standardized = objective(ids, slice(0, 4), scores)
    expected = _direct_cka_term(models, ids, *_all_positions(models, ids), scale=inv_std)
    assert standardized.cka_term == pytest.approx(expected, rel=1e-5)
    assert standardized.cka_term != pytest.approx(plain.cka_term, rel=1e-2)


class _CallCheckpointedLinear(torch.nn.Linear):
    """A layer checkpointed as older transformers releases do it: its whole __call__, forward hooks included, so the
    hooks run again in the backward pass (without early stop, the recompute runs to the end)."""

    checkpointed = False

    def __call__(self, x):
        if self.checkpointed and torch.is_grad_enabled():
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                return torch.utils.checkpoint.checkpoint(super().__call__, x, use_reentrant=False)
        return super().__call__(x)


def test_layer_tap_positions_survive_a_checkpoint_that_reruns_the_hooks():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([_CallCheckpointedLinear(8, 8) for _ in range(2)])
    tap = LayerTap(layers)
    x = torch.randn(3, 5, 8)
    positions = (torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 4, 3]))
    results = []
    for checkpointed in (False, True):
        fired = []
        handles = [layer.register_forward_hook(lambda *a: fired.append(1)) for layer in layers]
        layers.zero_grad()
        with tap.capture([0, 1], positions) as out:
            h, outputs = x, []
            for layer in layers:
                layer.checkpointed = checkpointed
                h = layer(h)
                outputs.append(h)
        assert sorted(out) == [0, 1]
        for i in (0, 1):
            assert torch.equal(out[i], outputs[i][positions])
        (h.square().sum() + sum(out[i].sum() * (i + 1) for i in out)).backward()
        assert len(fired) == (4 if checkpointed else 2)  # the hooks did run again, after the capture
        results.append([p.grad.clone() for p in layers.parameters()])
        for handle in handles:
            handle.remove()
    for a, b in zip(*results):
        assert torch.equal(a, b)


# -- options in a full (tiny) run ------------------------------------------------------------------------------
TINY_RUN = dict(teacher="tiny", steps=2, batch_size=4, seq_len=24, lr=1e-3, eval_every=100, save_every=100,
                eval_sequences=8, eval_tokens=32, cka_layers="all", cka_tokens=16)
TIMING = ("tokens_per_s", "step_time_s", "peak_mem_mb")


def _train(out: Path, models=None, teacher_memo=None, **overrides) -> tuple[dict, list[dict]]:
    """A tiny in-process run; (summary, metrics.jsonl records without the timing fields)."""
    cfg = DistillConfig(**{**TINY_RUN, **overrides}).resolved()
    train_ids, eval_ids = split_heldout(tiny_sequences(), cfg.eval_sequences, 1)
    summary = train(cfg, models or tiny_models(), train_ids, eval_ids, out, D.DistContext(), show_progress=False,
                    teacher_memo=teacher_memo)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_grad_checkpointing_recomputes_the_layers_and_changes_nothing_else(tmp_path):
    runs = {}
    for checkpointing in (False, True):
        models = tiny_models()
        calls = []  # a module inside a decoder layer: it runs again when the backward pass recomputes the layer
        decoder_layers(models.student)[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
        _, records = _train(tmp_path / str(checkpointing), models, grad_checkpointing=checkpointing, grad_accum=2)
        runs[checkpointing] = records, models.student.state_dict(), len(calls)
    (plain, plain_weights, plain_calls), (ckpt, ckpt_weights, ckpt_calls) = runs[False], runs[True]
    assert ckpt_calls == plain_calls + 2 * 2  # one recompute per micro-batch: 2 steps x 2 micro-batches
    assert ckpt == plain  # every logged loss, KL, CKA term, lambda and eval metric: bit-identical on the CPU
    assert all(torch.equal(plain_weights[k], ckpt_weights[k]) for k in plain_weights)
    assert [r["step"] for r in plain if r["type"] == "train"] == [1, 2] and plain[1]["cka_term"] > 0


def test_teacher_memo_gives_the_kl_only_run_the_teachers_outputs_and_changes_nothing(tmp_path):
    """The pipeline's KL-only baseline after CKA-QAD: with the memo its teacher runs only for evaluation, and its logs
    and student are bit for bit those of a run without it; the memo's budget is kept."""
    def kl_only(out: Path, memo):
        models = tiny_models()
        calls = []
        models.teacher.get_decoder().register_forward_hook(lambda *a: calls.append(1))
        _, records = _train(out, models, lambda_cka=0.0, grad_accum=2, teacher_memo=memo)
        return records, models.student.state_dict(), len(calls)

    memo = TeacherMemo()
    _train(tmp_path / "cka", lambda_cka=None, grad_accum=2, teacher_memo=memo)  # CKA-QAD fills it: 2 x 2 micro-batches
    assert len(memo._hidden) == 4 and memo.hits == 0
    with_memo, weights, teacher_calls = kl_only(tmp_path / "kl-memo", memo)
    without, plain_weights, plain_calls = kl_only(tmp_path / "kl", None)
    assert memo.hits == 4 and teacher_calls == plain_calls - 4
    assert with_memo == without
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    small = TeacherMemo(max_bytes=next(iter(memo._hidden.values())).nbytes)  # room for one micro-batch only
    _train(tmp_path / "small", lambda_cka=0.0, teacher_memo=small)
    assert len(small._hidden) == 1 and small.bytes <= small.max_bytes
    memo.clear()
    assert memo.get(torch.zeros(2, 3, dtype=torch.long)) is None and memo.bytes == 0


def _direct_topk_kl(student_logits, teacher_logits, k):
    """Mean over tokens of KL(p_T || p_S), both renormalized over the teacher's k most likely tokens."""
    top_t, index = teacher_logits.topk(k, dim=-1)
    log_p = top_t.log_softmax(-1)
    log_q = student_logits.gather(-1, index).log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_kl_topk_run_logs_the_top_k_kl_and_k_at_vocab_size_is_the_full_kl(tmp_path):
    vocab = tiny_models().student.config.vocab_size
    _, full = _train(tmp_path / "full", lambda_cka=0.0)
    _, top = _train(tmp_path / "top", lambda_cka=0.0, kl_topk=5)
    _, whole = _train(tmp_path / "whole", lambda_cka=0.0, kl_topk=vocab)
    assert whole == full  # K >= vocabulary is the full KL, bit for bit
    kls = [r["kl"] for r in top if r["type"] == "train"] + [r["eval_kl"] for r in top if r["type"] == "eval"]
    assert len(kls) == 4 and all(math.isfinite(v) and v >= 0 for v in kls)
    # step 1's KL, computed directly on the same rows with the untrained student
    models = tiny_models()
    train_ids, _ = split_heldout(tiny_sequences(), TINY_RUN["eval_sequences"], 1)
    ids = train_ids[train_rows(0, 0, n_train=train_ids.shape[0], batch=4, grad_accum=1, seed=0)]
    with torch.no_grad():
        s_logits, t_logits = models.student(ids).logits, models.teacher(ids).logits
    first = next(r for r in top if r["type"] == "train")
    assert first["kl"] == pytest.approx(_direct_topk_kl(s_logits, t_logits, 5), rel=1e-5)
    assert first["kl"] != pytest.approx(next(r for r in full if r["type"] == "train")["kl"], rel=1e-3)


def test_cka_filters_are_used_in_a_run_and_recorded(tmp_path):
    summary, records = _train(tmp_path / "filtered", cka_drop_massive=True, cka_standardize=True)
    _, plain = _train(tmp_path / "plain")
    assert "massive activations (> 100 x median)" in summary["cka_filters"]
    assert "standardized by teacher per-feature std" in summary["cka_filters"]
    first, first_plain = (next(r for r in rs if r["type"] == "train") for rs in (records, plain))
    assert first["kl"] == first_plain["kl"] and first["cka_term"] != pytest.approx(first_plain["cka_term"], rel=1e-3)


# -- reliability: NaN guard (in process) -----------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    models = tiny_models()
    cfg = DistillConfig(teacher="tiny", steps=6, batch_size=4, seq_len=24, lr=1e-3, eval_every=100, save_every=2,
                        eval_sequences=8, eval_tokens=32, cka_layers="all", cka_tokens=16).resolved()
    train_ids, eval_ids = split_heldout(tiny_sequences(), cfg.eval_sequences, 1)

    def poison(step):
        if step == 2:
            with torch.no_grad():
                models.teacher.lm_head.weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*step-2"):
        train(cfg, models, train_ids, eval_ids, tmp_path, D.DistContext(), on_step=poison, show_progress=False)
    assert checkpoints.complete_steps(tmp_path / "checkpoints") == [2]
    assert max(json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(CkaqadError, match="--resume"):  # a new run does not silently mix with the old checkpoints
        train(cfg, tiny_models(), train_ids, eval_ids, tmp_path, D.DistContext(), show_progress=False)


def test_resume_checks_settings_and_steps_and_logs_the_last_evaluation_once(tmp_path):
    """Resumed at its last step (a kill while the student was being written), a run evaluates that step again and
    logs it once; a changed clipping norm, or fewer steps than the checkpoint has done, is refused."""
    import dataclasses

    cfg = DistillConfig(teacher="tiny", steps=4, batch_size=4, seq_len=24, lr=1e-3, eval_every=100, save_every=2,
                        eval_sequences=8, eval_tokens=32, cka_layers="all", cka_tokens=16).resolved()
    train_ids, eval_ids = split_heldout(tiny_sequences(), cfg.eval_sequences, 1)

    def run(c: DistillConfig) -> dict:
        return train(c, tiny_models(), train_ids, eval_ids, tmp_path, D.DistContext(), show_progress=False)

    first = run(cfg)
    resumed = dataclasses.replace(cfg, resume=True)
    again = run(resumed)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 4]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    assert again["eval_kl"] == first["eval_kl"] and again["tokens_seen"] == 4 * 4 * 24
    with pytest.raises(CkaqadError, match=r"max_grad_norm: 1\.0 -> 0\.5"):
        run(dataclasses.replace(resumed, max_grad_norm=0.5))
    with pytest.raises(CkaqadError, match="already at step 4; pass --steps 4 or more"):
        run(dataclasses.replace(resumed, steps=3))


# -- reliability: SIGKILL, a kill during a checkpoint write, Ctrl-C (subprocesses) -----------------------------
def _worker(out: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(WORKER), str(out), "--steps", "6", "--save-every", "2", *args],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _student(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    _worker(out)
    return out


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _student(a), _student(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    train_a = [r for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines())]
    train_b = [r for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines())]
    drop = ("tokens_per_s", "step_time_s", "peak_mem_mb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in train_a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in train_b]


def test_sigkill_kill_during_save_and_ctrl_c_then_resume_is_bit_identical(uninterrupted, tmp_path):
    """One run, interrupted three ways in turn, each time resumed; it must end bit-identical to the clean run."""
    out = tmp_path / "run"
    _worker(out, "--kill-at", "3", expect=-9)  # SIGKILL after step 3: checkpoint 2 is the latest
    assert checkpoints.complete_steps(out / "checkpoints") == [2]
    assert not (out / "student").exists()

    _worker(out, "--resume", "--kill-in-save", "4", expect=-9)  # SIGKILL while checkpoint 4 is being written
    assert checkpoints.complete_steps(out / "checkpoints") == [2]
    assert (out / "checkpoints" / ".step-4.partial" / "student.safetensors").exists()  # written, never committed

    _worker(out, "--resume", "--sigint-at", "4", expect=130)  # Ctrl-C during step 5: it finishes, saves, exits
    assert checkpoints.complete_steps(out / "checkpoints") == [4, 5]
    assert not (out / "checkpoints" / ".step-4.partial").exists()

    _worker(out, "--resume")
    _assert_identical(uninterrupted, out)


def test_sigterm_stops_like_ctrl_c_and_resumes_bit_identical(uninterrupted, tmp_path):
    """A job scheduler's SIGTERM: the step under way finishes, a checkpoint is saved, exit 130; --resume continues."""
    out = tmp_path / "run"
    _worker(out, "--sigterm-at", "2", expect=130)
    assert checkpoints.complete_steps(out / "checkpoints") == [2, 3]
    _worker(out, "--resume")
    _assert_identical(uninterrupted, out)


# -- the CLI on the built-in teacher ---------------------------------------------------------------------------
def test_cli_distill_builtin_writes_student_that_loads(tmp_path):
    from ckaqad_cli.models import load_model
    from ckaqad_cli.quant import NVFP4Linear
    from ckaqad_cli.rundir import RunDir

    run = tmp_path / "run"
    args = ["distill", "--run", str(run), "--steps", "2", "--batch-size", "4", "--seq-len", "32",
            "--eval-sequences", "4", "--eval-tokens", "64", "--max-tokens", "4096", "--scheme", "w4a16",
            "--exclude", "*.layers.0.*", "--cka-standardize", "--save-every", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    entry = RunDir(run).stage_entry("distill")
    assert entry["status"] == "done" and entry["outputs"]["student"] == "distill/student"
    assert entry["config"]["cka_standardize"] is True and entry["config"]["cka_drop_massive"] is False
    assert "standardized by teacher per-feature std" in entry["metrics"]["cka_filters"]
    assert 0 < entry["metrics"]["mean_cka"] <= 1 and entry["metrics"]["eval_kl"] >= 0
    recipe = json.loads((run / "distill" / "student" / "quant_recipe.json").read_text())
    assert recipe["scheme"] == "w4a16" and "*.layers.0.*" in recipe["exclude"]
    student, _ = load_model(run / "distill" / "student", dtype=torch.float32)
    wrapped = {n for n, m in student.named_modules() if isinstance(m, NVFP4Linear)}
    assert wrapped and not any(".layers.0." in n for n in wrapped)
    lines = (run / "distill" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[1])
    for key in ("loss", "kl", "cka_term", "lambda", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert key in first
    assert entry["metrics"]["tokens_seen"] == 2 * 4 * 32
    assert entry["outputs"]["latest_checkpoint"] == "distill/checkpoints/step-2"  # recorded as each one completes
    again = CliRunner().invoke(app, args)  # finished: a second run needs --force
    assert again.exit_code == 1 and "--force" in again.output
    # a bad option with --force is refused before the stage starts: the finished stage stays finished
    for bad, message in ((["--cka-layers", "9"], "9"), (["--seq-len", "1000"], "over the teacher's limit of 256"),
                         (["--warmup", "-1"], "--warmup must be >= 0"),
                         (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
                         (["--max-tokens", "-5"], "--max-tokens must be at least 1")):
        refused = CliRunner().invoke(app, [*args, "--force", *bad])
        assert refused.exit_code == 1 and message in refused.output, (bad, refused.output)
        assert RunDir(run).stage_entry("distill")["status"] == "done", bad


# -- the gain (the paper's claim, on the built-in teacher) -----------------------------------------------------
GAIN_SETTINGS = dict(steps=30, batch_size=8, seq_len=32, lr=3e-4, eval_sequences=32, max_tokens=30000,
                     eval_every=1000, save_every=1000, seed=0)


@pytest.mark.slow
def test_cka_qad_keeps_more_geometry_than_kl_only_at_similar_kl(tmp_path):
    """Same seed, data and steps: CKA-QAD ends with a higher held-out mean layer CKA than KL-only QAD, and a
    held-out KL no more than 10% above it (docs/results.md has the longer run).

    Sized to hold with a margin: at the built-in preset's learning rate (3e-4) KL-only QAD drifts within 30 steps,
    and CKA-QAD's mean CKA is above it by 0.0054, 0.0026 and 0.0069 on seeds 0, 1 and 2 (transformers 5.25, torch
    2.13), its KL below. At lr 1e-4 the two differed by +-0.0005 with either sign over four seeds, within noise: that
    earlier version of this test passed or failed by luck (seed 0 gives bit-identical numbers under transformers 5.20
    and 5.25, so the flip did not come from that release; at that margin any change of float order decides). KL-only's held-out KL after 30 such steps can be above the
    PTQ student's (seeds 1 and 2), so only "it trained" is asserted of it."""
    from rich.console import Console

    from ckaqad_cli.rundir import RunDir
    from ckaqad_cli.stages.distill import run_distill

    quiet = Console(stderr=True, quiet=True)
    kl_only = run_distill(DistillConfig(lambda_cka=0.0, **GAIN_SETTINGS), RunDir(tmp_path / "kl"), console=quiet,
                          show_progress=False)
    cka_qad = run_distill(DistillConfig(**GAIN_SETTINGS), RunDir(tmp_path / "cka"), console=quiet,
                          show_progress=False)
    assert kl_only["mode"] == "kl-only" and cka_qad["mode"] == "cka-qad"
    assert kl_only["ptq_eval_kl"] == cka_qad["ptq_eval_kl"]  # the same student and held-out data at step 0
    assert kl_only["eval_kl"] != kl_only["ptq_eval_kl"]  # the baseline trained
    assert cka_qad["mean_cka"] > kl_only["mean_cka"]
    assert cka_qad["eval_kl"] <= 1.10 * kl_only["eval_kl"]


def test_training_prints_plain_progress_lines_without_a_terminal(tmp_path, monkeypatch):
    """stderr redirected to a log: rich draws no bar, so training prints plain-text progress lines instead."""
    import io

    from rich.console import Console

    monkeypatch.setenv("CKAQAD_PROGRESS_INTERVAL", "0")  # a line at every step (30 s by default)
    log = io.StringIO()
    cfg = DistillConfig(**TINY_RUN).resolved()
    train_ids, eval_ids = split_heldout(tiny_sequences(), cfg.eval_sequences, 1)
    train(cfg, tiny_models(), train_ids, eval_ids, tmp_path, D.DistContext(), console=Console(file=log, width=80))
    lines = [ln for ln in log.getvalue().splitlines() if ln.startswith("distill: ")]
    assert [ln.split(",")[0] for ln in lines] == ["distill: 1/2 (50%)", "distill: 2/2 (100%)"], log.getvalue()
    assert "elapsed" in lines[0] and "ETA" in lines[0] and "loss" in lines[0]


def test_dry_run_prints_the_estimate_and_touches_nothing(tmp_path):
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=80)
    summary = run_distill(DistillConfig(dry_run=True), RunDir(tmp_path / "run"), console=console)
    text = console.file.getvalue()
    assert summary == {} and not (tmp_path / "run").exists()
    assert "peak per rank" in text and "fits" in text


def test_mse_act_student_is_calibrated_and_saved_with_its_second_moments(tmp_path):
    """An mse-act distill calibrates the student's channel weights on training text and saves them beside the
    student (pack reads them from there)."""
    from rich.console import Console

    from ckaqad_cli.quant import QuantRecipe
    from ckaqad_cli.quant_calibration import SECOND_MOMENTS_FILE, load_second_moments

    cfg = DistillConfig(teacher="builtin", steps=1, batch_size=4, seq_len=32, eval_every=100, save_every=100,
                        eval_sequences=4, max_tokens=4096, scale_rule="mse-act")
    run_distill(cfg, RunDir(tmp_path / "run"), console=Console(stderr=True, quiet=True), show_progress=False)
    student = tmp_path / "run" / "distill" / "student"
    recipe = QuantRecipe.load(student)
    moments = load_second_moments(student)
    assert recipe.scale_rule == "mse-act" and (student / SECOND_MOMENTS_FILE).is_file()
    assert set(moments) == set(recipe.quantized)
    assert all(bool((m >= 0).all()) and bool((m > 0).any()) for m in moments.values())
