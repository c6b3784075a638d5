"""SGD, Adam and AdamW against torch.optim (one step and five, same params, grads and settings),
the schedules against their formulas and torch's LR schedulers, and clipping against torch's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attngraph import train
from attngraph.train.optimizers import CHUNK, PARALLEL_MIN, OptimizerError

torch = pytest.importorskip("torch")

# Shapes: a matrix, a vector, a scalar-like one, and one spanning several chunks of the kernel.
SHAPES = {"w": (5, 7), "b": (7,), "s": (1,), "big": (CHUNK + 1234,)}

CASES = {
    "sgd": (lambda lr: train.SGD(lr), lambda ps, lr: torch.optim.SGD(ps, lr=lr)),
    "sgd-momentum-wd": (lambda lr: train.SGD(lr, momentum=0.9, weight_decay=0.01),
                        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov-dampening": (
        lambda lr: train.SGD(lr, momentum=0.8, nesterov=True, weight_decay=0.1),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.8, nesterov=True, weight_decay=0.1)),
    "sgd-dampening": (lambda lr: train.SGD(lr, momentum=0.9, dampening=0.3),
                      lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, dampening=0.3)),
    "adam": (lambda lr: train.Adam(lr), lambda ps, lr: torch.optim.Adam(ps, lr=lr)),
    "adam-wd-betas": (lambda lr: train.Adam(lr, betas=(0.8, 0.98), eps=1e-6, weight_decay=0.1),
                      lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.98), eps=1e-6, weight_decay=0.1)),
    "adam-amsgrad": (lambda lr: train.Adam(lr, amsgrad=True), lambda ps, lr: torch.optim.Adam(ps, lr=lr, amsgrad=True)),
    "adamw": (lambda lr: train.AdamW(lr), lambda ps, lr: torch.optim.AdamW(ps, lr=lr)),
    "adamw-wd-amsgrad": (lambda lr: train.AdamW(lr, weight_decay=0.3, amsgrad=True),
                         lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.3, amsgrad=True)),
}


def make_problem(seed=0, shapes=SHAPES, steps=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(steps)]
    return params, grads


def run_ours(opt, params, grads):
    ours = {k: v.copy() for k, v in params.items()}
    for g in grads:
        opt.step(ours, {k: v.copy() for k, v in g.items()})
    return ours


def run_torch(make, params, grads, lr=1e-2, schedule=None, clip=None):
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = make(list(tp.values()), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    for g in grads:
        for k, t in tp.items():
            t.grad = torch.tensor(g[k].copy())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
        opt.step()
        if sched:
            sched.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


def assert_same(ours, theirs, tol=1e-6):
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_step_equals_torch(case, steps):
    ours_make, torch_make = CASES[case]
    params, grads = make_problem(steps=steps)
    assert_same(run_ours(ours_make(1e-2), params, grads), run_torch(torch_make, params, grads))


@pytest.mark.parametrize("case", ["sgd-momentum-wd", "adamw"])
def test_parallel_kernel_equals_torch(case):
    """Above PARALLEL_MIN elements the prange kernel runs; same numbers."""
    ours_make, torch_make = CASES[case]
    params, grads = make_problem(shapes={"w": (PARALLEL_MIN + 7,), "b": (3, 3)}, steps=2)
    assert_same(run_ours(ours_make(1e-2), params, grads), run_torch(torch_make, params, grads))


def test_float64_parameters():
    ours_make, torch_make = CASES["adam"]
    params, grads = make_problem(shapes={"w": (4, 3)}, dtype=np.float64)
    assert_same(run_ours(ours_make(1e-2), params, grads), run_torch(torch_make, params, grads), tol=1e-12)


def test_update_is_in_place_and_layout_is_checked():
    params, grads = make_problem(steps=1)
    ours = {k: v.copy() for k, v in params.items()}
    arrays = dict(ours)
    opt = train.SGD(0.1)
    opt.step(ours, grads[0])
    assert all(ours[k] is arrays[k] for k in ours) and not np.array_equal(ours["w"], params["w"])
    with pytest.raises(OptimizerError, match="missing"):
        opt.step(ours, {"w": grads[0]["w"]})
    with pytest.raises(OptimizerError, match="shape"):
        opt.step(ours, {**grads[0], "b": np.zeros(3, np.float32)})
    ours["w"] = ours["w"].astype(np.float64)
    with pytest.raises(OptimizerError, match="in place"):
        opt.step(ours, grads[0])


def test_state_dict_round_trip_continues_bit_identically():
    params, grads = make_problem(steps=6)
    a = train.AdamW(1e-2, amsgrad=True)
    pa = run_ours(a, params, grads[:3])
    state = a.state_dict()
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} and int(state["step"]) == 3
    b = train.AdamW(1e-2, amsgrad=True)
    b.load_state_dict(state)                       # before binding: kept until the first step binds
    pb = {k: v.copy() for k, v in pa.items()}
    for g in grads[3:]:
        a.step(pa, g)
        b.step(pb, g)
    for k in pa:
        assert np.array_equal(pa[k], pb[k])
    wrong = train.AdamW(1e-2)
    wrong.bind({"w": params["w"]})
    with pytest.raises(OptimizerError, match="entries"):
        wrong.load_state_dict(state)


# -- schedules -------------------------------------------------------------------------------------

def test_noam_formula():
    s = train.noam(d_model=512, warmup=4000)
    for step in (1, 10, 3999, 4000, 4001, 100000):
        assert s(step) == pytest.approx(512 ** -0.5 * min(step ** -0.5, step * 4000 ** -1.5), rel=1e-12)
    assert s(0) == s(1)                                             # never infinite
    peak = s(4000)
    assert s(3999) < peak and s(4001) < peak
    assert train.noam(64, 10, factor=2.0)(5) == pytest.approx(2 * train.noam(64, 10)(5))


def test_cosine_formula_and_torch_cosine_annealing():
    s = train.cosine(peak_lr=1.0, total_steps=110, warmup=10, min_lr=0.1)
    assert s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    ours = train.cosine(peak_lr=0.5, total_steps=20, min_lr=0.01)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.01)
    for k in range(20):
        assert ours(k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


@pytest.mark.parametrize("schedule", [train.noam(16, warmup=3), train.cosine(0.1, total_steps=4, warmup=2),
                                      train.constant(0.05)])
def test_scheduled_optimizer_equals_torch_lambda_lr(schedule):
    params, grads = make_problem(shapes={"w": (3, 4), "b": (4,)}, steps=5)
    opt = train.Adam(lr=schedule)
    ours = run_ours(opt, params, grads)
    theirs = run_torch(lambda ps, lr: torch.optim.Adam(ps, lr=1.0), params, grads,
                       schedule=lambda e: schedule(e + 1))
    assert_same(ours, theirs)
    assert opt.last_lr == pytest.approx(schedule(5))


# -- clipping ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_equals_torch(norm_type, max_norm):
    _, (grads,) = make_problem(steps=1, shapes={"w": (5, 7), "b": (7,)})
    ours = {k: v.copy() for k, v in grads.items()}
    total = train.clip_grad_norm(ours, max_norm, norm_type)
    ts = [torch.zeros(v.shape, requires_grad=True) for v in grads.values()]
    for t, v in zip(ts, grads.values()):
        t.grad = torch.tensor(v.copy())
    theirs = torch.nn.utils.clip_grad_norm_(ts, max_norm, norm_type)
    assert total == pytest.approx(float(theirs), rel=1e-6)
    for (k, v), t in zip(ours.items(), ts):
        np.testing.assert_allclose(v, t.grad.numpy(), rtol=1e-6, atol=1e-7)
    if max_norm > total:
        assert all(np.array_equal(ours[k], grads[k]) for k in grads)


def test_clip_norm_inside_the_optimizer_equals_torch():
    params, grads = make_problem(steps=3)
    opt = train.SGD(0.1, momentum=0.9, clip_norm=1.0)
    ours = run_ours(opt, params, grads)
    theirs = run_torch(lambda ps, lr: torch.optim.SGD(ps, lr=0.1, momentum=0.9), params, grads, clip=1.0)
    assert_same(ours, theirs)
    assert opt.last_grad_norm == pytest.approx(train.global_norm(grads[-1]), rel=1e-6)
