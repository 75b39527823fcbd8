"""The MoCE layer: moce_fast.MoCELayer (ops, torch backend) against the reference AdapterLayer,
the patch circular convolution against a direct sum, the routing plan and the auxiliary loss."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

import moce_fast
from moce_fast import ops, routing
from moce_fast.reference.moce import AdapterLayer, patch_circular_conv_reference
from conftest import randomize_, rel_err


def direct_patch_conv(q, k, p):
    """Circular convolution inside each p x p patch by its definition, in float64 loops over offsets."""
    b, c, h, w = q.shape
    hp, wp = h + (-h) % p, w + (-w) % p
    qz = torch.zeros(b, c, hp, wp, dtype=torch.float64)
    kz = torch.zeros_like(qz)
    qz[..., :h, :w] = q
    kz[..., :h, :w] = k
    out = torch.zeros_like(qz)
    for i0 in range(0, hp, p):
        for j0 in range(0, wp, p):
            qp = qz[..., i0:i0 + p, j0:j0 + p]
            kp = kz[..., i0:i0 + p, j0:j0 + p]
            acc = torch.zeros_like(qp)
            for di in range(p):
                for dj in range(p):
                    # out[u, v] += q[di, dj] * k[(u - di) mod p, (v - dj) mod p]
                    acc += qp[..., di:di + 1, dj:dj + 1] * torch.roll(kp, shifts=(di, dj), dims=(-2, -1))
            out[..., i0:i0 + p, j0:j0 + p] = acc
    return out[..., :h, :w]


@pytest.mark.parametrize("p,h,w", [(4, 4, 4), (4, 7, 10), (8, 9, 5), (16, 5, 18)])
def test_patch_conv_equals_direct_sum(p, h, w):
    g = torch.Generator().manual_seed(p * 100 + h)
    q = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    expected = direct_patch_conv(q, k, p)
    assert rel_err(patch_circular_conv_reference(q, k, p), expected) < 1e-12
    assert rel_err(ops.patch_circular_conv(q, k, p), expected) < 1e-12
    got32 = ops.patch_circular_conv(q.float(), k.float(), p)
    assert got32.dtype == torch.float32 and rel_err(got32, expected) < 1e-5


def make_layers(dim=16, num_experts=4, top_k=1, freq_dim=12, seed=0, dtype=torch.float64, rank_type="spread"):
    fast = moce_fast.MoCELayer(dim, 2, num_experts=num_experts, top_k=top_k, freq_dim=freq_dim,
                               rank_type=rank_type, with_complexity=True)
    randomize_(fast, seed)
    ref = AdapterLayer(dim, 2, num_experts=num_experts, top_k=top_k, freq_dim=freq_dim, rank_type=rank_type,
                       depth_type="constant", with_complexity=True, complexity_scale="max")
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast.to(dtype), ref.to(dtype)


def layer_inputs(b, dim=16, h=9, w=13, freq_dim=12, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, dim, h, w, generator=g, dtype=torch.float64)
    x = x + torch.linspace(-2, 2, b, dtype=torch.float64)[:, None, None, None] * torch.randn(dim, 1, 1, generator=g,
                                                                                          dtype=torch.float64)
    shared = torch.randn(b, dim, h, w, generator=g, dtype=torch.float64)
    freq = torch.randn(b, freq_dim, generator=g, dtype=torch.float64)
    return x.to(dtype), shared.to(dtype), freq.to(dtype)


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (3, 2), (4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("b", [0, 1, 5])
def test_layer_equals_reference_routed(num_experts, top_k, b):
    fast, ref = make_layers(num_experts=num_experts, top_k=top_k)
    fast.eval(), ref.eval()
    x, s, f = layer_inputs(b)
    with torch.no_grad():
        y = fast(x, f, s)
        y_ref = ref(x, f, s)
    assert y.shape == x.shape
    if b:
        assert rel_err(y, y_ref) < 1e-12


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("route", ["all-on-0", "all-on-last", "every-expert", "mixed-top2"])
def test_layer_equals_reference_given_routes(route, grad):
    """Given routes, the layer equals the reference; without grad the torch backend writes the
    experts' results straight into their rows where a chunk's images and rows form one run."""
    top_k = 2 if route == "mixed-top2" else 1
    fast, ref = make_layers(num_experts=4, top_k=top_k)
    b = 6
    x, s, f = layer_inputs(b, h=11, w=6)
    if route == "all-on-0":
        idx = torch.zeros(b, 1, dtype=torch.int64)
    elif route == "all-on-last":
        idx = torch.full((b, 1), 3, dtype=torch.int64)
    elif route == "every-expert":
        idx = torch.tensor([[0], [1], [2], [3], [1], [0]])
    else:
        idx = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [1, 0], [0, 2]])
    gates = torch.rand(b, top_k, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    with torch.set_grad_enabled(grad):
        y = fast(x, f, s, expert_indices=idx, expert_gates=gates)
    y_ref = ref(x, f, s, expert_indices=idx, expert_gates=gates)
    assert rel_err(y, y_ref) < 1e-12
    assert fast.aux_loss.item() == 0.0


@pytest.mark.parametrize("chunk_bytes", [1, 60000])
def test_cpu_chunks_equal_reference_in_inference(monkeypatch, chunk_bytes):
    """Chunks in inference: runs of consecutive images read as slices and written in place."""
    import importlib

    monkeypatch.setattr(importlib.import_module("moce_fast.ops.moce_experts"), "CPU_CHUNK_BYTES", chunk_bytes)
    fast, ref = make_layers(num_experts=4, top_k=1)
    b = 7
    x, s, f = layer_inputs(b, h=11, w=6)
    idx = torch.tensor([[0], [0], [0], [3], [0], [2], [3]])  # expert 0: images 0-2 a run, then 4
    gates = torch.rand(b, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    with torch.no_grad(), moce_fast.backend("torch"):
        y = fast(x, f, s, expert_indices=idx, expert_gates=gates)
        y_ref = ref(x, f, s, expert_indices=idx, expert_gates=gates)
    assert rel_err(y, y_ref) < 1e-12


@pytest.mark.parametrize("chunk_bytes", [1, 60000])
def test_cpu_chunks_equal_reference(monkeypatch, chunk_bytes):
    """The torch backend runs an expert's images in chunks on a CPU (CPU_CHUNK_BYTES): one image a
    chunk, or a few, give the reference's result and gradients, top-2 included."""
    import importlib

    monkeypatch.setattr(importlib.import_module("moce_fast.ops.moce_experts"), "CPU_CHUNK_BYTES", chunk_bytes)
    fast, ref = make_layers(num_experts=4, top_k=2)
    b = 6
    x, s, f = layer_inputs(b, h=11, w=6)
    idx = torch.tensor([[0, 3], [0, 2], [0, 1], [3, 1], [0, 3], [0, 2]])
    gates = torch.rand(b, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    xs = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    with moce_fast.backend("torch"):
        y = fast(xs, f, s, expert_indices=idx, expert_gates=gates)
    y_ref = ref(xr, f, s, expert_indices=idx, expert_gates=gates)
    assert rel_err(y, y_ref) < 1e-12
    y.sum().backward(), y_ref.sum().backward()
    assert rel_err(xs.grad, xr.grad) < 1e-12


def test_torch_backend_both_projection_paths_and_unpadded_patches():
    """The torch backend's NCHW expert path: ranks 4 and 8 (projection as W @ x, then transposed) and
    16 and 32 (x^T @ W^T in the GEMM), on a 16 x 16 map that patch sizes 4, 8 and 16 tile without
    padding (32 pads): output and every gradient equal the reference's."""
    fast, ref = make_layers(dim=32, num_experts=4, top_k=1)
    b = 5
    x, s, f = layer_inputs(b, dim=32, h=16, w=16)
    idx = torch.tensor([[0], [1], [2], [3], [2]])
    gates = torch.rand(b, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.1
    xf, sf = x.clone().requires_grad_(), s.clone().requires_grad_()
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    with moce_fast.backend("torch"):
        y = fast(xf, f, sf, expert_indices=idx, expert_gates=gates)
    y_ref = ref(xr, f, sr, expert_indices=idx, expert_gates=gates)
    assert rel_err(y, y_ref) < 1e-12
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y.backward(dy), y_ref.backward(dy)
    assert rel_err(xf.grad, xr.grad) < 1e-12 and rel_err(sf.grad, sr.grad) < 1e-12
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        if p.grad is None:  # the router: skipped when routes are given
            assert ref_params[name].grad is None, name
            continue
        assert rel_err(p.grad, ref_params[name].grad) < 1e-10, name
        checked += 1
    assert checked >= 4 * 13 + 1  # every expert's 13 tensors and proj_out


def test_layer_gradients_match_reference_in_training():
    fast, ref = make_layers(num_experts=4, top_k=2)
    fast.train(), ref.train()
    x, s, f = layer_inputs(6)
    inputs_f = [t.clone().requires_grad_() for t in (x, s, f)]
    inputs_r = [t.clone().requires_grad_() for t in (x, s, f)]
    torch.manual_seed(11)
    out_f = fast(inputs_f[0], inputs_f[2], inputs_f[1])
    loss_f = (out_f * torch.cos(out_f)).sum() + fast.aux_loss
    torch.manual_seed(11)
    out_r = ref(inputs_r[0], inputs_r[2], inputs_r[1])
    loss_r = (out_r * torch.cos(out_r)).sum() + ref.aux_loss
    assert rel_err(out_f, out_r) < 1e-12
    assert fast.aux_loss.item() == pytest.approx(ref.aux_loss.item(), rel=1e-12)
    loss_f.backward()
    loss_r.backward()
    for a, r, name in zip(inputs_f, inputs_r, ["x", "shared", "freq_emb"]):
        assert rel_err(a.grad, r.grad) < 1e-10, name
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if ref_params[name].grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:
            assert rel_err(p.grad, ref_params[name].grad) < 1e-10, name


def test_layer_gradcheck_float64():
    fast, _ = make_layers(dim=8, num_experts=2, top_k=2, freq_dim=4)
    fast.eval()
    x, s, f = layer_inputs(2, dim=8, h=5, w=6, freq_dim=4)
    args = [t.clone().requires_grad_() for t in (x, f, s)]
    assert torch.autograd.gradcheck(lambda a, b, c: fast(a, b, c), args, eps=1e-6, atol=1e-6)


def test_batched_eval_equals_one_image_at_a_time():
    fast, ref = make_layers(num_experts=4, top_k=1, seed=4)
    fast.eval(), ref.eval()
    with torch.no_grad():
        for p in fast.routing.parameters():
            p.mul_(8)  # decisive router: the batch spreads over experts
    ref.load_state_dict(fast.state_dict())
    x, s, f = layer_inputs(8, seed=5)
    with torch.no_grad():
        batched = fast(x, f, s)
        chosen = fast.last_routing[0].flatten().tolist()
        assert len(set(chosen)) >= 3, chosen
        single = torch.cat([fast(x[i:i + 1], f[i:i + 1], s[i:i + 1]) for i in range(8)])
        single_ref = torch.cat([ref(x[i:i + 1], f[i:i + 1], s[i:i + 1]) for i in range(8)])
        batched_ref = ref(x, f, s)
    assert rel_err(batched, single) < 1e-12
    assert rel_err(batched_ref, single_ref) < 1e-12


def independent_aux_loss(x, freq, w_gate, w_freq, complexity, noise, k):
    """The auxiliary loss of spec section 3, from its formulas, in plain Python floats."""
    b, e_count = len(noise), len(noise[0])
    pooled = x.double().mean(dim=(2, 3)).tolist()
    logits = [[sum(w_gate[e][c] * pooled[i][c] for c in range(len(pooled[i]))) +
               sum(w_freq[e][j] * freq[i][j] for j in range(len(freq[i]))) for e in range(e_count)]
              for i in range(b)]
    std = 1.0 / e_count
    noisy = [[logits[i][e] + noise[i][e] * std for e in range(e_count)] for i in range(b)]
    importance = [0.0] * e_count
    for i in range(b):
        z = sum(math.exp(v) for v in logits[i])
        for e in range(e_count):
            importance[e] += math.exp(logits[i][e]) / z
    importance = [importance[e] * complexity[e] for e in range(e_count)]
    loss_imp = (statistics.stdev(importance) / (statistics.fmean(importance) + 1e-8)) ** 2
    load = [0.0] * e_count
    for i in range(b):
        threshold = sorted(noisy[i], reverse=True)[k - 1]
        for e in range(e_count):
            z = (threshold - logits[i][e]) / std
            load[e] += (1.0 - 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))) / b
    loss_load = (statistics.stdev(load) / (statistics.fmean(load) + 1e-8)) ** 2
    return 0.5 * loss_imp + 0.5 * loss_load


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_equals_formulas(top_k):
    fast, ref = make_layers(num_experts=4, top_k=top_k)
    fast.train(), ref.train()
    x, s, f = layer_inputs(5)
    torch.manual_seed(21)
    noise = torch.randn(5, 4, dtype=torch.float64)
    expected = independent_aux_loss(x, f.tolist(), fast.routing.gate[2].weight.tolist(),
                                    fast.routing.freq_gate.weight.tolist(), fast.routing.complexity.tolist(),
                                    noise.tolist(), top_k)
    for layer in (fast, ref):
        torch.manual_seed(21)
        layer(x, f, s)
        assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-9)


def test_make_plan_sorts_and_counts():
    g = torch.Generator().manual_seed(0)
    for b, k, e in [(7, 1, 4), (5, 2, 3), (1, 1, 2), (6, 3, 3)]:
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b)])
        gates = torch.rand(b, k, generator=g)
        plan = routing.make_plan(idx, gates, e)
        assert plan.counts.tolist() == [int((idx == j).sum()) for j in range(e)]
        assert plan.offsets.tolist() == [0] + torch.cumsum(plan.counts, 0).tolist()
        flat = idx.flatten()
        for j in range(e):
            sl = slice(plan.offsets[j], plan.offsets[j + 1])
            assert torch.all(flat[plan.order[sl]] == j)
            assert plan.image[sl].tolist() == sorted(plan.image[sl].tolist())  # stable: images ascending
        assert torch.equal(plan.gate, gates.flatten()[plan.order])
        assert sorted(plan.order.tolist()) == list(range(b * k))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_layer_low_precision_against_float64(dtype, tol):
    fast, ref = make_layers(num_experts=4, top_k=2)
    fast.eval(), ref.eval()
    x, s, f = layer_inputs(4)
    idx = torch.tensor([[0, 1], [2, 3], [3, 0], [1, 2]])
    gates = torch.full((4, 2), 0.5, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x, f, s, expert_indices=idx, expert_gates=gates)
        fast.to(dtype)
        got = fast(x.to(dtype), f.to(dtype), s.to(dtype), expert_indices=idx, expert_gates=gates.to(dtype))
    assert got.dtype == dtype
    assert rel_err(got, expected) < tol


def test_flops_follow_the_route():
    """Routing every image to the cheapest expert costs that expert's FLOPs, not all experts'."""
    from torch.utils.flop_counter import FlopCounterMode

    fast, _ = make_layers(dim=32, num_experts=4, top_k=1)
    fast.eval()
    x, s, f = layer_inputs(4, dim=32, h=16, w=16)

    def flops(expert):
        idx = torch.full((4, 1), expert, dtype=torch.int64)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fast(x, f, s, expert_indices=idx, expert_gates=torch.ones(4, 1, dtype=torch.float64))
        return counter.get_total_flops()

    costs = [flops(e) for e in range(4)]
    assert costs == sorted(costs) and costs[0] * 4 < costs[3]
    dense = sum(costs) - 3 * costs[0]  # every expert run on every image would cost at least this
    assert costs[0] < dense / 3


def test_bad_inputs_raise_clear_errors():
    fast, _ = make_layers()
    x, s, f = layer_inputs(2)
    with pytest.raises(ValueError, match="shared: expected shape"):
        fast(x, f, s[:, :, :-1])
    with pytest.raises(ValueError, match=r"freq_emb: expected shape \(2, 12\)"):
        fast(x, f[:, :5], s)
    with pytest.raises(ValueError, match="x: expected 16 channels"):
        fast(x[:, :8], f, s[:, :8])
    with pytest.raises(ValueError, match="expert_indices: expected values in"):
        fast(x, f, s, expert_indices=torch.tensor([[0], [4]]), expert_gates=torch.ones(2, 1, dtype=x.dtype))
    with pytest.raises(ValueError, match="expert_gates: expected a tensor of shape"):
        fast(x, f, s, expert_indices=torch.tensor([[0], [1]]), expert_gates=torch.ones(2, 2))
    with pytest.raises(ValueError, match="expert_indices: expected an int64"):
        fast(x, f, s, expert_indices=torch.tensor([[0.0], [1.0]]), expert_gates=torch.ones(2, 1))
    with pytest.raises(ValueError, match="expert_gates: given without expert_indices"):
        fast(x, f, s, expert_gates=torch.ones(2, 1))
    # another dtype or device than the parameters': named (torch's product error named neither)
    other = torch.float32 if x.dtype == torch.float64 else torch.float64
    with pytest.raises(ValueError, match=rf"x: {other}, the module's parameters {x.dtype} \(convert one"):
        fast(x.to(other), f.to(other), s.to(other))
    with pytest.raises(ValueError, match=r"x: on meta, the module's parameters on cpu \(move one"):
        fast(x.to("meta"), f.to("meta"), s.to("meta"))
    with pytest.raises(ValueError, match="top_k"):
        moce_fast.MoCELayer(16, top_k=5, num_experts=4)
    with pytest.raises(ValueError, match="num_experts"):
        moce_fast.MoCELayer(16, num_experts=1)


def test_block_bad_inputs_raise_clear_errors():
    # MoCEBlock used on its own: each bad x named (before, torch's permute, LayerNorm and conv errors)
    block = moce_fast.MoCEBlock(16, num_heads=2, freq_dim=None).eval()
    with pytest.raises(ValueError, match=r"x: expected a 4-D \(B, C, H, W\) tensor, got shape \(16, 8, 8\)"):
        block(torch.rand(16, 8, 8))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        block([[0.0]])
    with pytest.raises(ValueError, match=r"x: expected 16 channels, got shape \(2, 15, 8, 8\)"):
        block(torch.rand(2, 15, 8, 8))
    with pytest.raises(ValueError, match="x: expected a floating dtype, got torch.int64"):
        block(torch.randint(0, 3, (2, 16, 8, 8)))
    with pytest.raises(ValueError, match=r"x: torch.float64, the module's parameters torch.float32 \(convert one"):
        block(torch.rand(2, 16, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: on meta, the module's parameters on cpu \(move one"):
        block(torch.rand(2, 16, 8, 8, device="meta"))
    with torch.no_grad():
        assert block(torch.rand(2, 16, 8, 8)).shape == (2, 16, 8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another dtype runs under autocast
            assert block(torch.rand(2, 16, 8, 8)).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dim": 0}, ValueError, "dim: expected a positive int, got 0"),
    ({"dim": -4}, ValueError, "dim: expected a positive int, got -4"),
    ({"dim": 16.0}, TypeError, r"dim: expected a positive int, got 16.0 \(float\)"),
    ({"dim": True}, TypeError, "dim: expected a positive int, got True"),
    ({"num_heads": 0}, ValueError, "num_heads: expected a positive int, got 0"),
    ({"num_heads": -2}, ValueError, "num_heads: expected a positive int, got -2"),
    ({"num_heads": 3}, ValueError, "num_heads: must divide dim=16, got 3"),
    ({"ffn_expansion_factor": 0}, ValueError, r"ffn_expansion_factor: .* got int\(16 \* 0\) = 0"),
    ({"ffn_expansion_factor": 0.05}, ValueError, r"ffn_expansion_factor: .* got int\(16 \* 0.05\) = 0"),
    ({"freq_dim": 0}, ValueError, "freq_dim: expected a positive int, got 0"),
    ({"freq_dim": 8.5}, TypeError, "freq_dim: expected a positive int"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, error, match):
    # (they raised torch's own errors from inside the layers: "groups must be a positive integer",
    # "integer modulo by zero", "negative dimension"; freq_dim=0 was taken)
    args = {"dim": 16, "num_heads": 2, **kwargs}
    with pytest.raises(error, match=match):
        moce_fast.MoCEBlock(**args)
    if set(kwargs) <= {"dim", "freq_dim"}:
        with pytest.raises(error, match=match):
            moce_fast.MoCELayer(**kwargs if "dim" in kwargs else {"dim": 16, **kwargs})
    assert moce_fast.MoCEBlock(np.int64(16), num_heads=np.int64(2)).norms[0].dim == 16  # numpy ints are ints


def test_expert_forward_nhwc_equals_nchw_path():
    """ops.expert_forward (public, channels-last tensors) and the NCHW path the grouped dispatch
    runs compute the same expert, for narrow and wide ranks."""
    from moce_fast.ops.moce_experts import expert_forward_nchw

    fast, _ = make_layers(dim=32, num_experts=4, top_k=1)
    x, s, _ = layer_inputs(2, dim=32, h=9, w=13)
    for w in fast.expert_weights():
        nchw = expert_forward_nchw(x, s, w)
        nhwc = moce_fast.ops.expert_forward(x.permute(0, 2, 3, 1).contiguous(), s.permute(0, 2, 3, 1).contiguous(), w)
        assert rel_err(nhwc.permute(0, 3, 1, 2), nchw) < 1e-12
