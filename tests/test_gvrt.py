"""GVRT: the optimizer wrapper against a plain restatement of its rules, its properties, schedulers,
state dicts, bad input, and two-process DDP / FSDP2 / sharded runs on CPU (gloo)."""

import copy
import json
import math
import pathlib
import pickle
import statistics
import subprocess
import sys

import pytest
import torch
from deepseek_rs import GVRT, DTypeError, InvalidValueError
from deepseek_rs.training.gvrt import LR_Z_CAP, global_grad_norm
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

TINY = torch.finfo(torch.float32).tiny


def reference_rules(
    norms,
    *,
    warmup_steps=25,
    alpha=0.97,
    z_threshold=2.5,
    clip="adaptive",
    lr_beta=0.8,
    lr_tolerance=2.0,
    min_lr_factor=0.1,
    eps=1e-6,
    warmup_clip_factor=10.0,
):
    """(clip threshold or None, lr factor) of each step, written from the docstring's rules."""
    out, warm = [], []
    mean = var = mean_fast = var_fast = 0.0
    for g in norms:
        if len(warm) < warmup_steps:
            bound = (
                math.inf
                if not warm or warmup_clip_factor is None
                else warmup_clip_factor * statistics.median(warm)
            )
            warm.append(min(g, bound))
            if len(warm) == warmup_steps:
                mean = statistics.median(warm)
                var = (1.4826 * statistics.median(abs(x - mean) for x in warm)) ** 2
                mean_fast, var_fast = mean, var
            out.append((bound if g > bound else None, 1.0))
            continue
        std = max(math.sqrt(var), eps * abs(mean), TINY)
        z = (g - mean) / std
        threshold = None
        if z > z_threshold:
            threshold = {
                "zscore": mean + z_threshold * std,
                "adaptive": mean + z_threshold**2 * std / z,
                "mean": mean,
            }[clip]
            if threshold >= g:
                threshold = None
        effective = g if threshold is None else threshold
        x = min(g, mean + LR_Z_CAP * z_threshold * std)
        mean_fast, var_fast = (
            lr_beta * mean_fast + (1 - lr_beta) * x,
            lr_beta * (var_fast + (1 - lr_beta) * (x - mean_fast) ** 2),
        )
        mean, var = (
            alpha * mean + (1 - alpha) * effective,
            alpha * (var + (1 - alpha) * (effective - mean) ** 2),
        )
        ratio = var_fast / max(math.sqrt(var), eps * abs(mean), TINY) ** 2
        factor = 1.0 if ratio <= lr_tolerance else max(min_lr_factor, math.sqrt(lr_tolerance / ratio))
        out.append((threshold, factor))
    return out


def drive(norms, seed=0, lr=0.5, **kwargs):
    """Feed GVRT(SGD) one gradient of each given norm; check each update against the rules."""
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))
    opt = GVRT(torch.optim.SGD([p], lr=lr), **kwargs)
    seen, measured = [], []
    for norm in norms:
        d = torch.randn(7, generator=g, dtype=torch.float64)
        grad = d / d.norm() * norm
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        last = opt.last
        seen.append((last.clip_threshold, last.lr_factor))
        measured.append(last.grad_norm)
        coef = 1.0 if last.clip_threshold is None else last.clip_threshold / last.grad_norm
        bound = norm if last.clip_threshold is None else last.clip_threshold
        assert p.grad.norm().item() <= bound * (1 + 1e-9)
        torch.testing.assert_close(
            p.detach(), before - lr * last.lr_factor * coef * grad, rtol=1e-12, atol=1e-12
        )
        assert opt.param_groups[0]["lr"] == lr  # the factor never outlives its step
        assert kwargs.get("min_lr_factor", 0.1) <= last.lr_factor <= 1.0
    return opt, seen, measured


norm_lists = st.lists(st.floats(1e-3, 1e3), min_size=0, max_size=80)


@given(norm_lists, st.sampled_from(["zscore", "adaptive", "mean"]), st.integers(2, 10))
def test_steps_follow_the_rules(norms, clip, warmup_steps):
    _, seen, measured = drive(norms, clip=clip, warmup_steps=warmup_steps)
    assert measured == pytest.approx(norms, rel=1e-12)
    want = reference_rules(measured, clip=clip, warmup_steps=warmup_steps)
    for (t, f), (rt, rf) in zip(seen, want):
        assert (t is None) == (rt is None)
        if t is not None:
            assert t == pytest.approx(rt, rel=1e-9)
        assert f == pytest.approx(rf, rel=1e-9)


@given(st.lists(st.floats(1e-2, 1e3), max_size=60), st.floats(0.1, 10))
def test_scaling_every_norm_scales_thresholds_and_keeps_lr_factors(norms, c):
    _, a, _ = drive(norms, warmup_steps=4)
    _, b, _ = drive([n * c for n in norms], warmup_steps=4)
    for (ta, fa), (tb, fb) in zip(a, b):
        assert (ta is None) == (tb is None)
        if ta is not None and tb is not None:
            assert tb == pytest.approx(ta * c, rel=1e-6)
        assert fb == pytest.approx(fa, rel=1e-6, abs=1e-9)


def test_no_clipping_during_warmup_and_a_spike_after_is_clipped_and_lowers_the_rate():
    norms = [1.0 + 0.1 * math.sin(i) for i in range(30)] + [1000.0] + [1.0] * 5
    opt, seen, _ = drive(norms, warmup_steps=25)
    assert all(t is None and f == 1.0 for t, f in seen[:25])
    threshold, factor = seen[30]
    assert threshold is not None and threshold < 1.5
    assert factor < 1.0 and seen[35][1] > factor  # lowered at the spike, recovering after
    assert opt.last.clipped_steps == 1


def test_a_spike_during_the_warmup_does_not_inflate_the_thresholds():
    norms = [1.0 + 0.1 * math.sin(i) for i in range(25)]
    norms[10] = 500.0
    _, seen, _ = drive(norms + [5.0], warmup_steps=25)
    assert seen[10][0] == pytest.approx(10 * statistics.median(norms[:10]))  # caught in the warm-up
    threshold, _ = seen[-1]
    assert threshold is not None and threshold < 1.5


def test_constant_norms_are_never_clipped():
    _, seen, _ = drive([2.0] * 40, warmup_steps=5)
    assert all(t is None and f == 1.0 for t, f in seen)


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=30), st.floats(1e-2, 10))
def test_max_norm_is_a_ceiling_at_every_step(norms, max_norm):
    _, seen, _ = drive(norms, warmup_steps=5, max_norm=max_norm)
    for norm, (t, _) in zip(norms, seen):
        assert min(norm, t or math.inf) <= max_norm * (1 + 1e-9)


def test_lr_adaptation_can_be_switched_off():
    norms = [1.0 + 0.1 * math.sin(i) for i in range(30)] + [1000.0] * 5
    _, seen, _ = drive(norms, warmup_steps=25, adapt_lr=False)
    assert all(f == 1.0 for _, f in seen)
    assert seen[-1][0] is not None


def test_scheduler_values_are_untouched():
    """A scheduler on the wrapper sets the same rates as on a plain optimizer."""
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = GVRT(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), warmup_steps=3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=40)
    plain = torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.1, momentum=0.9)
    plain_sched = torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=0.5, total_steps=40)
    for i in range(39):
        x = torch.randn(16, 4) * (1e3 if i % 7 == 6 else 1.0)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        plain.step()
        sched.step()
        plain_sched.step()
        assert opt.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
        assert opt.param_groups[0]["momentum"] == plain.param_groups[0]["momentum"]
    assert opt.last.clipped_steps > 0 and sched.get_last_lr() == plain_sched.get_last_lr()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    ],
    ids=["sgd-nesterov", "adam", "adamw", "rmsprop", "adagrad", "adamax"],
)
def test_any_optimizer_equals_manual_clipping_and_lr_scaling(make):
    """GVRT(opt) gives the same parameters as opt stepped on the same clipped gradients with the
    same scaled rates, by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = copy.deepcopy(net)
    opt = GVRT(make(net.parameters()), warmup_steps=4)
    plain = make(twin.parameters())
    for i in range(20):
        x, y = torch.randn(8, 6) * (50.0 if i in (9, 10) else 1.0), torch.randn(8, 2)
        for model, o in ((net, opt), (twin, plain)):
            o.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        last = opt.last
        if last.clip_threshold is not None:
            nn.utils.clip_grad_norm_(twin.parameters(), last.clip_threshold)
        lr = plain.param_groups[0]["lr"]
        plain.param_groups[0]["lr"] = lr * last.lr_factor
        plain.step()
        plain.param_groups[0]["lr"] = lr
    assert opt.last.clipped_steps >= 1
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def run_steps(opt, net, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(8, 3, generator=g) * (100.0 if i % 9 == 8 else 1.0)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = GVRT(torch.optim.AdamW(net.parameters(), lr=1e-2), warmup_steps=5)
    run_steps(opt, net, 20, 0)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), pickle.loads(pickle.dumps(opt.state_dict()))
    assert set(saved_opt) == {"state", "param_groups", "gvrt"}
    run_steps(opt, net, 15, 1)

    net2 = nn.Linear(3, 2)
    net2.load_state_dict(saved_net)
    opt2 = GVRT(torch.optim.AdamW(net2.parameters(), lr=1e-2), warmup_steps=5)
    opt2.load_state_dict(saved_opt)
    run_steps(opt2, net2, 15, 1)
    assert opt2.last == opt.last
    for a, b in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plain_optimizer_state_dict_restarts_the_warmup_and_bad_state_is_refused():
    net = nn.Linear(3, 2)
    opt = GVRT(torch.optim.SGD(net.parameters(), lr=1e-2), warmup_steps=5)
    run_steps(opt, net, 8, 0)
    assert not opt.warming_up
    opt.load_state_dict(opt.optimizer.state_dict())
    assert opt.warming_up
    bad = opt.state_dict()
    bad["gvrt"] = {"step": 3}
    with pytest.raises(InvalidValueError, match="lacks"):
        opt.load_state_dict(bad)


def test_wrapper_and_wrapped_share_groups_and_state():
    net = nn.Linear(3, 2)
    inner = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt = GVRT(inner)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["lr"] == 0.5
    run_steps(opt, net, 3, 0)
    assert len(inner.state) == 2  # Adam state of the weight and bias (extra has no gradient)
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_closure_is_evaluated_once_and_its_loss_returned():
    net = nn.Linear(3, 1)
    opt = GVRT(torch.optim.SGD(net.parameters(), lr=0.1))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = net(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss) and opt.last.grad_norm > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_skip_the_step_or_raise(bad):
    p = nn.Parameter(torch.ones(3))
    opt = GVRT(torch.optim.SGD([p], lr=0.1), warmup_steps=3)
    p.grad = torch.tensor([1.0, bad, 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.last.skipped_steps == 1 and opt.last.step == 0
    assert opt.state_dict()["gvrt"]["count"] == 0  # the statistics did not see it
    strict = GVRT(torch.optim.SGD([p], lr=0.1), nonfinite="raise")
    with pytest.raises(InvalidValueError, match="gradient norm is"):
        strict.step()


def test_no_gradients_is_a_zero_norm_step():
    p = nn.Parameter(torch.ones(3))
    opt = GVRT(torch.optim.SGD([p], lr=0.1))
    opt.step()
    assert opt.last.grad_norm == 0.0 and torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 0}, "alpha"),
        ({"lr_beta": 1.5}, "lr_beta"),
        ({"z_threshold": 0}, "z_threshold"),
        ({"z_threshold": float("nan")}, "z_threshold"),
        ({"warmup_steps": 1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"clip": "percentile"}, "clip must be one of"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"warmup_clip_factor": 0.5}, "warmup_clip_factor"),
        ({"min_lr_factor": 0.0}, "min_lr_factor"),
        ({"lr_tolerance": -2}, "lr_tolerance"),
        ({"norm_type": 0}, "norm_type"),
        ({"norm_type": float("nan")}, "norm_type"),
        ({"eps": float("nan")}, "eps"),
        ({"min_lr_factor": float("nan")}, "min_lr_factor"),
        ({"warmup_clip_factor": float("nan")}, "warmup_clip_factor"),
        ({"max_norm": float("inf")}, "max_norm"),
        ({"adapt_lr": "no"}, "adapt_lr must be a bool"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(InvalidValueError, match=match):
        GVRT(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), **kwargs)


def test_only_optimizers_it_can_serve_are_wrapped():
    p = [nn.Parameter(torch.ones(1))]
    with pytest.raises(DTypeError, match="GVRT wraps a torch.optim.Optimizer, got list"):
        GVRT(p)  # type: ignore[arg-type]
    with pytest.raises(DTypeError, match="LBFGS"):
        GVRT(torch.optim.LBFGS(p))
    with pytest.raises(DTypeError, match="GVRT"):
        GVRT(GVRT(torch.optim.SGD(p, lr=0.1)))
    with pytest.raises(TypeError):  # DTypeError is a TypeError: old `except TypeError` still works
        GVRT(None)  # type: ignore[arg-type]


class _NoLR(torch.optim.Optimizer):
    """An optimizer whose groups have no learning rate."""

    def __init__(self, params):
        super().__init__(params, {"scale": 0.5})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.mul_(group["scale"])


def test_an_optimizer_without_learning_rates_needs_adapt_lr_false():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(InvalidValueError, match="group without one: pass adapt_lr=False"):
        GVRT(_NoLR([p]))
    opt = GVRT(_NoLR([p]), adapt_lr=False, warmup_steps=2)
    for _ in range(4):
        p.grad = torch.ones(2)
        opt.step()
    assert opt.last.step == 4


def test_a_closure_must_be_callable():
    opt = GVRT(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    with pytest.raises(DTypeError, match="closure must be callable"):
        opt.step(1.0)  # type: ignore[arg-type]


def test_global_grad_norm_bad_input():
    with pytest.raises(DTypeError, match="grads must be tensors, got a NoneType"):
        global_grad_norm([torch.ones(2), None])  # type: ignore[list-item]
    with pytest.raises(InvalidValueError, match="norm_type"):
        global_grad_norm([torch.ones(2)], -1.0)


def _trained(steps=4):
    p = nn.Parameter(torch.ones(2))
    opt = GVRT(torch.optim.SGD([p], lr=0.1), warmup_steps=2)
    for i in range(steps):
        p.grad = torch.full((2,), 1.0 + i)
        opt.step()
    return p, opt


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda sd: 5, DTypeError, "state_dict must be a mapping, got int"),
        (lambda sd: {**sd, "gvrt": 3}, InvalidValueError, "the 'gvrt' state must be a mapping"),
        (lambda sd: {**sd, "gvrt": {"mean": 1.0}}, InvalidValueError, "the 'gvrt' state lacks"),
        (
            lambda sd: {**sd, "gvrt": {**sd["gvrt"], "mean": float("nan")}},
            InvalidValueError,
            "mean must be a finite number, got nan",
        ),
        (
            lambda sd: {**sd, "gvrt": {**sd["gvrt"], "var": -1.0}},
            InvalidValueError,
            "var must be a finite number >= 0",
        ),
        (
            lambda sd: {**sd, "gvrt": {**sd["gvrt"], "count": 2.5}},
            InvalidValueError,
            "count must be an integer >= 0",
        ),
        (
            lambda sd: {**sd, "gvrt": {**sd["gvrt"], "warmup_norms": [1.0, float("inf")]}},
            InvalidValueError,
            "warmup_norms must be a list of finite numbers",
        ),
        (
            lambda sd: {**sd, "param_groups": []},
            InvalidValueError,
            "cannot load this state dict: loaded state dict has a different number of parameter groups",
        ),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "param_groups"},
            InvalidValueError,
            "cannot load this state dict",
        ),
    ],
)
def test_a_bad_state_dict_changes_nothing(change, error, match):
    p, opt = _trained()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(change(copy.deepcopy(before)))
    assert opt.state_dict() == before


@given(st.lists(st.integers(0, 5), min_size=1, max_size=5), st.sampled_from([1.0, 2.0, 3.0, float("inf")]))
def test_global_grad_norm_is_the_norm_of_the_concatenation(sizes, p):
    g = torch.Generator().manual_seed(len(sizes))
    grads = [torch.randn(n, 2, generator=g) for n in sizes]
    flat = torch.cat([x.flatten() for x in grads])
    want = torch.linalg.vector_norm(flat, p) if flat.numel() else torch.tensor(0.0)
    torch.testing.assert_close(global_grad_norm(grads, p), want)


def test_distributed_ddp_fsdp2_and_sharded_runs_match_one_process(tmp_path):
    worker = pathlib.Path(__file__).with_name("gvrt_distributed_worker.py")
    # One retry, in a fresh directory (the file store of a failed try holds stale addresses):
    # gloo's rendezvous on loopback has been seen to fail now and then on a loaded 2-CPU host; a
    # real failure fails both tries.
    for attempt in range(2):
        out_dir = tmp_path / f"try{attempt}"
        out_dir.mkdir()
        proc = subprocess.run([sys.executable, str(worker), str(out_dir)], capture_output=True, timeout=240)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for out in ranks:
        for run, ref in (("ddp", "reference"), ("fsdp2", "reference_adam")):
            got, want = out[run], out[ref]
            assert sum(t is not None for _, t, _ in want) >= 1  # the spike was clipped
            for (n, t, f), (rn, rt, rf) in zip(got, want):
                assert n == pytest.approx(rn, rel=1e-4)
                assert (t is None) == (rt is None)
                assert f == pytest.approx(rf, rel=1e-3)
            for a, b in zip(out[f"{run}_params"], out[f"{ref}_params"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
        for p in ("2.0", "1.0", "inf"):
            assert out[f"sharded_norm_{p}"] == pytest.approx(out[f"full_norm_{p}"], rel=1e-6)
    assert ranks[0]["ddp"] == ranks[1]["ddp"]  # every rank took the same decisions


def test_step_hooks_run_and_a_deep_copy_is_independent():
    p = nn.Parameter(torch.ones(3))
    opt = GVRT(torch.optim.Adam([p], lr=0.1), warmup_steps=2)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert calls == [1, 1, 1]
    twin = copy.deepcopy(opt)
    assert (
        twin.param_groups[0]["params"][0] is not p and twin.state_dict()["gvrt"] == opt.state_dict()["gvrt"]
    )
    twin.param_groups[0]["lr"] = 1.0
    assert opt.param_groups[0]["lr"] == 0.1


def test_grad_scaler_steps_the_wrapper_on_unscaled_gradients():
    torch.manual_seed(0)
    net, twin = nn.Linear(4, 1), nn.Linear(4, 1)
    twin.load_state_dict(net.state_dict())
    opt = GVRT(torch.optim.SGD(net.parameters(), lr=0.1), warmup_steps=3)
    ref = GVRT(torch.optim.SGD(twin.parameters(), lr=0.1), warmup_steps=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(6):
        x = torch.randn(8, 4)
        opt.zero_grad()
        scaler.scale(net(x).pow(2).mean()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        twin(x).pow(2).mean().backward()
        ref.step()
        assert opt.last.grad_norm == pytest.approx(ref.last.grad_norm, rel=1e-6)
    torch.testing.assert_close(net.weight, twin.weight)
