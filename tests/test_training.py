"""Training-loop parts: schedule, RNG capture, NaN guard, Ctrl-C flag, metrics log, checkpoint folder semantics."""

import json
import os
import random
import signal

import pytest
import torch

from ckaqad_cli import checkpoints
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.settings.distill import warmup_steps
from ckaqad_cli.training import (
    MetricsLog,
    NonFiniteLossError,
    StopRequest,
    build_optimizer,
    capture_rng_state,
    check_finite,
    cosine_factor,
    restore_rng_state,
)


def test_schedule_warms_up_then_decays_to_zero():
    total, warm = 100, 10
    factors = [cosine_factor(s, warmup=warm, total=total) for s in range(total)]
    assert all(a < b for a, b in zip(factors[:warm], factors[1 : warm + 1]))  # strictly rising during warmup
    assert factors[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1 :]))  # non-increasing after
    assert cosine_factor(total, warmup=warm, total=total) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(warm + (total - warm) // 2, warmup=warm, total=total) == pytest.approx(0.5)
    assert warmup_steps(0.05, 200) == 10 and warmup_steps(7, 200) == 7 and warmup_steps(0, 50) == 0
    with pytest.raises(CkaqadError):
        warmup_steps(-1, 10)
    assert warmup_steps(10, 10) == 10
    with pytest.raises(CkaqadError, match=r"^--warmup 11 steps is longer than the run \(--steps 10\)"):
        warmup_steps(11, 10)
    with pytest.raises(CkaqadError, match=r"^--warmup 2.5: .* whole number"):
        warmup_steps(2.5, 10)


def test_optimizer_follows_schedule_and_has_no_weight_decay_by_default():
    p = torch.nn.Parameter(torch.ones(3))
    opt, sched = build_optimizer([p], lr=1e-3, weight_decay=0.0, total_steps=10, warmup=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(3)
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[2] == pytest.approx(1e-3)
    torch.testing.assert_close(p.detach(), torch.ones(3))  # zero gradient and no decay: weights untouched


def test_rng_capture_restores_every_generator():
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    tensors, extras = capture_rng_state({"g": gen})
    json.dumps(extras)  # JSON-able, no pickle needed
    expected = (torch.rand(4), torch.rand(4, generator=gen), random.random())
    torch.rand(10), torch.rand(10, generator=gen), random.random()
    restore_rng_state(tensors, extras, {"g": gen})
    got = (torch.rand(4), torch.rand(4, generator=gen), random.random())
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert got[2] == expected[2]


def test_nan_guard_names_the_step_and_checkpoint():
    check_finite(3, "the loss", 1.5, {}, None)
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 7 .*kl=0\.5.*step-5"):
        check_finite(7, "the loss", float("nan"), {"kl": 0.5, "cka_term": None}, "runs/x/distill/checkpoints/step-5")
    with pytest.raises(NonFiniteLossError, match="inf at step 2.*no checkpoint"):
        check_finite(2, "the gradient norm", float("inf"), {}, None)


def test_stop_request_catches_first_sigint_only_while_installed():
    # Python's own handler, as in a terminal (under nohup or in a background job SIGINT starts ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopRequest()
        with stop.installed():
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_metrics_log_appends_and_truncates_past_resume_point(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by a kill
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    log.write({"step": 4, "loss": 0.0})
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4]


def test_only_complete_checkpoints_count_and_pruning_keeps_last(tmp_path):
    for step in (2, 4, 6):
        d = checkpoints.step_dir(tmp_path, step)
        d.mkdir()
        (d / checkpoints.COMPLETE).write_text("")
    checkpoints.step_dir(tmp_path, 8).mkdir()  # no marker: being written when the process died
    (tmp_path / ".step-10.partial").mkdir()
    assert checkpoints.complete_steps(tmp_path) == [2, 4, 6]
    assert checkpoints.latest_complete(tmp_path).name == "step-6"
    checkpoints.prune(tmp_path, keep=2)
    assert checkpoints.complete_steps(tmp_path) == [4, 6]
    assert not (tmp_path / ".step-10.partial").exists()
