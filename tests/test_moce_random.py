"""The MoCE layer on randomly drawn calls against the float64 reference (moce_fast.reference.moce.
AdapterLayer, the public-equal layer): the targeted tests in test_moce_layer.py pick their shapes;
these draw them from a fixed seed, so every run checks the same calls. Drawn: width, number of
experts and top-k, rank and depth rules, map sizes from 1 to 33 per side (smaller than the largest
patches too), batch 1 to 5, routing by the router or given (oracle) routes, an image routed twice
to one expert in its top-k, eval and training.

Checked: the output, both input gradients (x and shared) and every parameter's gradient, on the
torch backend in float64 (output to 1e-10 of its size, gradients to 1e-8) and, on smaller draws,
the triton backend in float32 (its kernels through Triton's interpreter here; output to 1e-4,
gradients to 1e-3). A gradient is measured against its own size or a thousandth of the largest
parameter gradient, whichever is larger: an expert of rank 1 has exactly zero gradients for its
first stages (LayerNorm over one channel), and LayerNorm over two channels is ill-conditioned
where they nearly meet (its gradients move by 1e-10 of their size in float64 and by 1e-4 in
float32 with the order of a sum).
"""

from __future__ import annotations

import random

import pytest
import torch

import moce_fast
from moce_fast.reference.moce import AdapterLayer
from conftest import randomize_, rel_err

SIDES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 24, 31, 33]
CASES = 40
TRITON_SIDES = [1, 2, 3, 5, 8, 9, 16]
TRITON_CASES = 6
FREQ_DIM = 12


def _draw(seed: int, sides=SIDES, dims=(8, 16, 24, 48)) -> dict:
    rng = random.Random(seed)
    ne = rng.choice([2, 3, 4])
    top_k = rng.randint(1, ne)
    return dict(dim=rng.choice(dims), num_experts=ne, top_k=top_k, rank_type=rng.choice(["spread", "constant"]),
                depth_type=rng.choice(["constant", "lin"]), stage_depth=rng.choice([1, 2]), hh=rng.choice(sides),
                ww=rng.choice(sides), n=rng.choice([1, 2, 3, 5]), oracle=rng.random() < 0.6,
                repeat=top_k > 1 and rng.random() < 0.4, train=rng.random() < 0.6, seed=rng.randrange(1 << 30))


def _layers(case: dict, dtype: torch.dtype):
    kw = dict(num_experts=case["num_experts"], top_k=case["top_k"], freq_dim=FREQ_DIM, rank_type=case["rank_type"],
              depth_type=case["depth_type"], stage_depth=case["stage_depth"], with_complexity=True)
    fast = randomize_(moce_fast.MoCELayer(case["dim"], 2, **kw), case["seed"])
    ref = AdapterLayer(case["dim"], 2, complexity_scale="max", **kw)
    ref.load_state_dict(fast.state_dict(), strict=True)
    # eval: the router without noise (a noisy router would route each side differently)
    return fast.to(dtype).eval(), ref.double().eval()


def _check(case: dict, backend: str, dtype: torch.dtype, out_tol: float, grad_tol: float) -> None:
    fast, ref = _layers(case, dtype)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    shape = (case["n"], case["dim"], case["hh"], case["ww"])
    x, shared, gy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    freq = torch.randn(case["n"], FREQ_DIM, generator=g, dtype=torch.float64)
    routes = {}
    if case["oracle"]:
        idx = torch.stack([torch.randperm(case["num_experts"], generator=g)[:case["top_k"]] for _ in range(case["n"])])
        if case["repeat"]:
            idx[:, 1] = idx[:, 0]  # one expert twice in an image's top-k: both slots' gates count
        routes = dict(expert_indices=idx, expert_gates=torch.rand(idx.shape, generator=g, dtype=torch.float64) + 0.1)
    train = case["train"]

    xr, sr = x.clone().requires_grad_(train), shared.clone().requires_grad_(train)
    want = ref(xr, freq, sr, **routes)
    if train:
        want.backward(gy)
    xf, sf = x.to(dtype).requires_grad_(train), shared.to(dtype).requires_grad_(train)
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in routes.items()}
    with moce_fast.backend(backend), torch.set_grad_enabled(train):
        got = fast(xf, freq.to(dtype), sf, **cast)
        if train:
            got.backward(gy.to(dtype))

    assert rel_err(got, want) <= out_tol, ("output", case)
    if not train:
        return
    assert rel_err(xf.grad, xr.grad) <= grad_tol, ("gradient of x", case)
    assert rel_err(sf.grad, sr.grad) <= grad_tol, ("gradient of shared", case)
    ref_params = dict(ref.named_parameters())
    scale = max((p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None), default=0.0)
    for name, p in fast.named_parameters():
        r = ref_params[name].grad
        if r is None and p.grad is None:  # (the router's, with given routes)
            continue
        r = torch.zeros_like(ref_params[name]) if r is None else r
        size = max(r.abs().max().item(), 1e-3 * scale)
        err = ((torch.zeros_like(p) if p.grad is None else p.grad).double() - r).abs().max().item()
        assert err <= grad_tol * size or err == 0.0, (f"gradient of {name}", err, size, case)


@pytest.mark.parametrize("index", range(CASES))
def test_random_call_matches_the_reference(index):
    _check(_draw(4100 + index), "torch", torch.float64, 1e-10, 1e-8)


@pytest.mark.parametrize("index", range(TRITON_CASES))
def test_random_call_on_triton_matches_the_reference(index):
    _check(_draw(5207 + index, TRITON_SIDES, (8, 16)), "triton", torch.float32, 1e-4, 1e-3)


def test_the_draws_cover_what_they_claim():
    # (draws that never routed by the router, never repeated an expert or never trained would
    # check less than the docstring says)
    for cases in ([_draw(4100 + i) for i in range(CASES)],
                  [_draw(5207 + i, TRITON_SIDES, (8, 16)) for i in range(TRITON_CASES)]):
        assert any(c["oracle"] for c in cases) and any(not c["oracle"] for c in cases)
        assert any(c["train"] for c in cases) and any(not c["train"] for c in cases)
        assert any(c["n"] > 1 for c in cases) and any(c["top_k"] > 1 for c in cases)
    cases = [_draw(4100 + i) for i in range(CASES)]
    assert any(c["oracle"] and c["repeat"] and c["train"] for c in cases)
    assert any(min(c["hh"], c["ww"]) < 8 for c in cases)  # smaller than the 8x8 and larger patches
    assert any(c["hh"] % 2 == 1 and c["ww"] % 2 == 1 for c in cases)
    assert {c["rank_type"] for c in cases} == {"spread", "constant"} and any(c["stage_depth"] == 2 for c in cases)
