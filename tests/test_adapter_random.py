"""AdaptIR adapters on randomly drawn calls against the float64 reference: the targeted tests pick
their shapes; these draw them (map sizes from 1 to 65 per side, odd and even, batch 1 to 5, the
three layouts, eval and training, one task or two to three tasks' adapters on one batch), from a
fixed seed, so every run checks the same calls.

For each call: the output, the input gradient, every parameter's gradient and BatchNorm's running
statistics, on the torch backend and (where moce_fast._C is built) the cpu backend, in float64;
and on smaller draws, the triton backend in float32 (its kernels through Triton's interpreter here).
Reference: each task's public-equal adapter (moce_fast.reference.AdaptIR, exact phase at the
self-conjugate bins) on that task's images alone, its BatchNorm on their statistics.

Tolerances: the output to 1e-10 of its size, gradients to 1e-7 of theirs. A spectrum bin near zero
makes the phase ill-conditioned: there the gradients move by 1e-11 to 1e-9 of their size when the
map moves by one rounding (the reference against itself, measured), and moce_fast's dense DFT
products round differently from torch.fft. A mistake (a wrong tap, bin, statistic or task) is
off by far more than 1e-7.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import moce_fast
from moce_fast import adapters
from moce_fast.reference import AdaptIR
from conftest import assert_param_grads_close, from_layout, randomize_, rel_err, skip_unless_backend_runs, to_layout

SIDES = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 31, 33, 48, 64, 65]
CASES = 40
# the triton backend's calls: fewer and smaller (its kernels run in Triton's interpreter on a CPU)
TRITON_SIDES = [1, 2, 3, 5, 8, 9, 16, 17]
TRITON_CASES = 8


def _draw(seed: int, sides=SIDES, max_values: int = 6000) -> dict:
    rng = random.Random(seed)
    variant = rng.choice(["ipt", "edt"])
    layout = rng.choice(["nchw", "nhwc", "lnc"])
    while True:
        hh = rng.choice(sides)
        ww = hh if layout == "lnc" else rng.choice(sides)
        n = rng.choice([1, 1, 2, 3, 5])
        if n * hh * ww <= max_values:
            break
    ntask = rng.choice([1, 1, 2, 3])
    return dict(variant=variant, dim=192 if variant == "ipt" else rng.choice([56, 112]), layout=layout, hh=hh,
                ww=ww, n=n, tasks=[f"t{i}" for i in range(ntask)], per=[f"t{rng.randrange(ntask)}" for _ in range(n)],
                train=rng.random() < 0.6, seed=rng.randrange(1 << 30))


class _Host(nn.Module):
    """A host whose MLP passes its input through, so that its output is x + adapter(x): by
    add_adapters (several tasks), or here with the single adapter as ``adapter`` (one task)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Identity()
        self.adapter = None

    def forward(self, x):
        return self.mlp(x) if self.adapter is None else x + self.adapter(x)


def _references(case: dict) -> dict[str, AdaptIR]:
    g = torch.Generator().manual_seed(case["seed"])
    refs = {}
    for i, name in enumerate(case["tasks"]):
        ref = randomize_(AdaptIR(case["dim"], case["variant"]).double(), case["seed"] + 2 + i)
        ref.exact_phase = True
        with torch.no_grad():
            ref.BN.running_mean.normal_(generator=g)
            ref.BN.running_var.uniform_(0.5, 1.5, generator=g)
        ref.train(case["train"])
        refs[name] = ref
    return refs


def _expected(case, refs, x, gy):
    """x + each task's adapter on its images, and the input gradient (each reference keeps its
    parameters' gradients and its running statistics after the call)."""
    out, dx = x.clone(), gy.clone()
    for name, ref in refs.items():
        idx = [i for i, t in enumerate(case["per"]) if t == name]
        if idx:
            xi = x[idx].clone().requires_grad_(case["train"])
            yi = ref(xi)
            out[idx] += yi.detach()
            if case["train"]:
                yi.backward(gy[idx])
                dx[idx] += xi.grad
    return out, dx


def _adapted(case, refs, training):
    host = _Host()
    if len(case["tasks"]) == 1:
        host.adapter = moce_fast.AdaptIRAdapter(case["dim"], case["variant"], case["layout"])
        sites = {case["tasks"][0]: host.adapter}
    else:
        adapters.add_adapters(host, r"mlp$", dim=case["dim"], variant=case["variant"], layout=case["layout"],
                              tasks=tuple(case["tasks"]))
        sites = {name: host.mlp.adapters[name] for name in case["tasks"]}
    host.double()
    for name, site in sites.items():
        site.load_state_dict(refs[name].state_dict())
    host.train(training)
    return host, sites


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("index", range(CASES))
def test_random_call_matches_the_reference(index, backend):
    skip_unless_backend_runs(backend)
    _check(_draw(20261129 + index), backend, torch.float64, 1e-10, 1e-7)


@pytest.mark.parametrize("index", range(TRITON_CASES))
def test_random_call_on_triton_matches_the_reference(index):
    # float32 (the interpreter's dtype; on a GPU the kernels run it too): the output to 1e-5 of its
    # size, gradients to 2e-4 (the largest in these draws: the head weight's, 5.0e-5; float32
    # rounding of the map moves an ill-conditioned phase's gradient by up to 1e-3)
    _check(_draw(7011 + index, TRITON_SIDES, 600), "triton", torch.float32, 1e-5, 2e-4)


def _check(case: dict, backend: str, dtype: torch.dtype, out_tol: float, grad_tol: float) -> None:
    train, layout, n = case["train"], case["layout"], case["n"]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    shape = (n, case["dim"], case["hh"], case["ww"])
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    refs = _references(case)
    host, sites = _adapted(case, refs, train)
    host.to(dtype)
    out, dx = _expected(case, refs, x, gy)

    xt = to_layout(x, layout).to(dtype).requires_grad_(train)
    per = case["per"] if len(case["tasks"]) > 1 else None
    with moce_fast.backend(backend):
        with adapters.tasks(per) if per else torch.enable_grad():
            if train:
                y = host(xt)
                y.backward(to_layout(gy, layout).to(dtype))
            else:
                with torch.no_grad():
                    y = host(xt)

    assert rel_err(from_layout(y, layout, shape), out) <= out_tol, ("output", case)
    if not train:
        return
    assert rel_err(from_layout(xt.grad, layout, shape), dx) <= grad_tol, ("input gradient", case)
    stat_tol = 1e-12 if dtype == torch.float64 else 1e-6
    for name, site in sites.items():
        assert_param_grads_close(site, refs[name], grad_tol)
        for stat in ("running_mean", "running_var"):
            assert rel_err(getattr(site.BN, stat), getattr(refs[name].BN, stat)) <= stat_tol, (name, stat, case)


def test_the_draws_cover_what_they_claim():
    # (random draws that all fell on one layout, or never on a task mix, would check less than the
    # docstring says)
    cases = [_draw(20261129 + i) for i in range(CASES)]
    assert {c["layout"] for c in cases} == {"nchw", "nhwc", "lnc"}
    assert {c["train"] for c in cases} == {True, False}
    assert any(len(c["tasks"]) > 1 and len(set(c["per"])) > 1 and c["train"] for c in cases)
    assert any(len(c["tasks"]) > 1 and not c["train"] for c in cases)
    assert any(c["hh"] % 2 == 1 and c["ww"] % 2 == 0 for c in cases)
    assert any(min(c["hh"], c["ww"]) == 1 for c in cases)
    assert any(c["hh"] * c["ww"] > 256 for c in cases) and any(c["hh"] * c["ww"] <= 64 for c in cases)
    assert any(c["n"] > 1 for c in cases) and any(c["variant"] == "ipt" for c in cases)
    small = [_draw(7011 + i, TRITON_SIDES, 600) for i in range(TRITON_CASES)]
    assert any(c["train"] for c in small) and any(not c["train"] for c in small)
    assert any(len(set(c["per"])) > 1 and c["train"] for c in small)
    assert {c["layout"] for c in small} == {"nchw", "nhwc", "lnc"}
    # (BatchNorm in training on one value per channel is an error, tested in test_adaptir.py)
    assert not any(c["train"] and c["n"] * c["hh"] * c["ww"] == 1 for c in cases + small)
