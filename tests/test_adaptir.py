"""AdaptIR: the reference (equal to the public adapter: checked locally against csguoh/AdaptIR to
6e-16 in float64, train and eval) and the layout-aware module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moce_fast
from moce_fast.reference import AdaptIR
from conftest import (CPU_TRAIN_NODE, adapter_case, from_layout, grad_node, graph_nodes, randomize_, rel_err,
                      skip_unless_backend_runs)

@pytest.fixture(autouse=True)
def _torch_backend():
    """This file tests the reference and the torch backend's paths: under "auto" a CPU with the
    extension built takes its CPU kernel (tests/test_adapter_cpu_kernel.py) for most of these calls.
    A test that names a backend itself overrides this one."""
    with moce_fast.backend("torch"):
        yield


PUBLIC_KEYS = [
    "head.weight", "head.bias", "BN.weight", "BN.bias", "BN.running_mean", "BN.running_var", "BN.num_batches_tracked",
    "conv_weight_A", "conv_weight_B", "conv_bias", "amp_fuse.weight", "amp_fuse.bias", "pha_fuse.weight",
    "pha_fuse.bias", "compress.weight", "compress.bias", "proj.0.weight", "proj.0.bias", "proj.2.weight",
    "proj.2.bias", "tail.weight", "channel_interaction.1.weight", "channel_interaction.1.bias",
    "channel_interaction.3.weight", "channel_interaction.3.bias", "spatial_interaction.weight",
    "spatial_interaction.bias",
]


@pytest.mark.parametrize("variant,dim,hidden,reduced", [("ipt", 576, 24, 3), ("edt", 180, 12, 3)])
def test_public_names_and_shapes(variant, dim, hidden, reduced):
    sd = AdaptIR(dim, variant).state_dict()
    assert sorted(sd) == sorted(PUBLIC_KEYS)
    assert sd["conv_weight_A"].shape == (hidden, hidden // 2) and sd["conv_weight_B"].shape == (hidden // 2, 9)
    assert sd["channel_interaction.1.weight"].shape == (reduced, hidden, 1, 1)
    assert sd["tail.weight"].shape == (dim, hidden, 1, 1)


@pytest.mark.parametrize("variant", ["ipt", "edt"])
def test_new_adapter_is_an_exact_no_op(variant):
    adapter = moce_fast.AdaptIRAdapter(192 if variant == "ipt" else 56, variant)
    x = torch.randn(2, adapter.d_model, 6, 6)
    assert torch.count_nonzero(adapter(x)) == 0


def _inputs(layout, dim, n=2, side=5):
    x = torch.randn(n, dim, side, side, dtype=torch.float64)
    if layout == "nchw":
        return x, x.clone()  # two leaves: each call's input gradient is its own
    if layout == "nhwc":
        return x, x.permute(0, 2, 3, 1).contiguous()
    return x, x.flatten(2).permute(2, 0, 1).contiguous()  # (L, N, C), row-major tokens


@pytest.mark.parametrize("layout", ["nchw", "lnc", "nhwc"])
@pytest.mark.parametrize("variant", ["ipt", "edt"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layouts_equal_reference(layout, variant, mode):
    dim = 192 if variant == "ipt" else 56
    adapter = randomize_(moce_fast.AdaptIRAdapter(dim, variant, layout)).double()
    ref = AdaptIR(dim, variant).double()
    with torch.no_grad():
        adapter.BN.running_mean.normal_()
        adapter.BN.running_var.uniform_(0.5, 1.5)
    ref.load_state_dict(adapter.state_dict())
    getattr(adapter, mode)(), getattr(ref, mode)()
    x, xl = _inputs(layout, dim)
    x.requires_grad_(), xl.requires_grad_()
    y = adapter(xl)
    expected = ref(x)
    if layout == "nhwc":
        expected = expected.permute(0, 2, 3, 1)
    elif layout == "lnc":
        expected = expected.flatten(2).permute(2, 0, 1)
    assert y.shape == xl.shape
    assert rel_err(y, expected) < 1e-12
    if mode == "train":  # batch statistics update the running ones, as in the public adapter
        assert rel_err(adapter.BN.running_mean, ref.BN.running_mean) < 1e-12
    # gradients of the input and of every parameter, from one random upstream gradient
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y.backward(dy), expected.backward(dy)
    dx = xl.grad
    if layout == "nhwc":
        dx = dx.permute(0, 3, 1, 2)
    elif layout == "lnc":
        dx = dx.permute(1, 2, 0).reshape(x.shape)
    assert rel_err(dx, x.grad) < 1e-10
    ref_params = dict(ref.named_parameters())
    for name, p in adapter.named_parameters():
        expect = ref_params[name].grad  # compress.bias: exactly 0 in exact arithmetic (softmax shift)
        assert (p.grad - expect).abs().max() <= 1e-9 * max(1.0, expect.abs().max().item()), name


def test_gradcheck_float64():
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).double().eval()
    x = torch.randn(1, 4, 4, 56, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(adapter, (x,), eps=1e-6, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="layout: expected one of"):
        moce_fast.AdaptIRAdapter(192, layout="nlc")
    with pytest.raises(ValueError, match="variant: expected one of"):
        moce_fast.AdaptIRAdapter(192, variant="swin")
    # the user-facing module names its own argument (dim), the reference the public one (d_model)
    with pytest.raises(ValueError, match=r"dim: 96 is too small for the ipt adapter \(hidden = dim // 24 = 4 "
                                         r"must be at least 8\)"):
        moce_fast.AdaptIRAdapter(96, "ipt")
    with pytest.raises(ValueError, match=r"d_model: 96 is too small"):
        AdaptIR(96, "ipt")
    for width in (192.0, "192", True, None):
        with pytest.raises(TypeError, match=r"dim: expected the model width as an int, got"):
            moce_fast.AdaptIRAdapter(width, "ipt")
        with pytest.raises(TypeError, match=r"d_model: expected the model width as an int, got"):
            AdaptIR(width, "ipt")
    assert moce_fast.AdaptIRAdapter(np.int64(192), "ipt").d_model == 192
    lnc = moce_fast.AdaptIRAdapter(192, layout="lnc")
    with pytest.raises(ValueError, match="square token grid"):
        lnc(torch.randn(12, 2, 192))
    with pytest.raises(ValueError, match="expected 192 channels"):
        lnc(torch.randn(16, 2, 191))
    nhwc = moce_fast.AdaptIRAdapter(192, layout="nhwc")
    with pytest.raises(ValueError, match=r"expects \(N, H, W, C\)"):
        nhwc(torch.randn(2, 192, 4))
    with pytest.raises(ValueError, match="floating-point"):
        nhwc(torch.zeros(1, 4, 4, 192, dtype=torch.int64))
    # x on another device than the parameters (a meta tensor here: the CPU paths ran on it and gave
    # a CPU result), in eval and in training
    for mode in ("eval", "train"):
        getattr(nhwc, mode)()
        with pytest.raises(ValueError, match=r"x: on meta, the module's parameters on cpu \(move one"):
            nhwc(torch.randn(2, 4, 4, 192, device="meta"))


@pytest.mark.parametrize("layout", ["nchw", "lnc", "nhwc"])
@pytest.mark.parametrize("n,side", [(1, 5), (3, 5), (1, 17), (2, 17)])
def test_inference_without_autograd_equals_reference(layout, n, side):
    # no grad mode takes its own paths: the head's product without its autograd Function, parameter
    # views kept on the adapter between calls, the dense DFT products up to 16x16 (side 5: dense,
    # 17: FFT), and for one image its pixel-major path (ops.adapter._adaptir_one_image)
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)).double().eval()
    ref = AdaptIR(56, "edt").double().eval()
    ref.load_state_dict(adapter.state_dict())
    for _ in range(2):  # the second call runs on the kept views
        x, xl = _inputs(layout, 56, n=n, side=side)
        with torch.no_grad():
            y, expected = adapter(xl), ref(x)
        if layout == "nhwc":
            expected = expected.permute(0, 2, 3, 1)
        elif layout == "lnc":
            expected = expected.flatten(2).permute(2, 0, 1)
        assert rel_err(y, expected) < 1e-12


@pytest.mark.parametrize("n", [1, 2])  # 1: the kept one-image plan (ops.adapter.OneImagePlan) too
def test_kept_parameter_views_follow_every_change(n):
    """The views kept for calls outside autograd see in-place updates, and are rebuilt when a
    tensor is moved, converted or replaced (a stale view would silently compute with old weights)."""
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).double().eval()
    ref = AdaptIR(56, "edt").double().eval()
    x = torch.randn(n, 5, 5, 56, dtype=torch.float64)

    def check(dtype=torch.float64, tol=1e-12):
        ref.load_state_dict(adapter.state_dict())
        ref.to(dtype)
        with torch.no_grad():
            y, expected = adapter(x.to(dtype)), ref(x.to(dtype).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert y.dtype == dtype and rel_err(y, expected) < tol

    check()
    with torch.no_grad():  # in place (an optimizer step, load_state_dict): the same storage
        adapter.tail.weight.mul_(-2.0)
        adapter.BN.running_var.add_(0.5)
    check()
    adapter.head.weight = torch.nn.Parameter(torch.randn_like(adapter.head.weight))  # a new parameter
    check()
    adapter.conv_weight_B.data = torch.randn_like(adapter.conv_weight_B)  # .data swapped, as Module.to does
    check()
    adapter.proj[0] = randomize_(torch.nn.Linear(*adapter.proj[0].weight.shape[::-1]).double(), 5)  # a new module
    check()
    adapter.BN.running_mean = torch.randn_like(adapter.BN.running_mean)  # a new buffer
    check()
    adapter.float()  # converted: every storage new
    check(torch.float32, 1e-5)
    adapter.double()
    # autograd after no-grad calls: gradients reach the parameters (no kept views in the graph)
    adapter(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.named_parameters()
               if n != "compress.bias")


@pytest.mark.parametrize("n", [1, 2])
def test_inference_mode_parameters_are_not_kept(n):
    """Parameters made under torch.inference_mode keep no version counter: an in-place update of
    them cannot be detected, so no folded parameters are kept for them (a stale fold would compute
    with the old BatchNorm)."""
    with torch.inference_mode():
        adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).double().eval()
        x = torch.randn(n, 5, 5, 56, dtype=torch.float64)
        first = adapter(x)
        adapter.BN.running_var.mul_(4.0)
        adapter.tail.weight.mul_(-1.0)
        ref = AdaptIR(56, "edt").double().eval()
        ref.load_state_dict(adapter.state_dict())
        second, expected = adapter(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert "_moce_fast_folded" not in adapter.__dict__
    assert rel_err(second, expected) < 1e-12 and rel_err(first, second) > 1e-3


def test_no_grad_inference_traces_without_graph_breaks_under_torch_compile():
    # the kept parameter views are plain Python state: skipped while dynamo traces (a graph break
    # at every adapter would split a host model's graph)
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).eval()
    x = torch.randn(2, 5, 5, 56)
    compiled = torch.compile(adapter, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), adapter(x), rtol=1e-6, atol=1e-6)


def test_training_step_compiles_with_inductor_and_equals_eager():
    # inductor fails on the complex backward of the traced composition (and on the public adapter's):
    # under torch.compile the mix runs as its eager Function behind a graph break, the rest compiles
    torch._dynamo.reset()
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).train()
    x = torch.randn(2, 6, 6, 56, requires_grad=True)
    y = torch.compile(adapter)(x)
    y.square().mean().backward()
    grads = [x.grad] + [p.grad for p in adapter.parameters()]
    x.grad = None
    for p in adapter.parameters():
        p.grad = None
    expected = adapter(x)
    expected.square().mean().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, [x.grad] + [p.grad for p in adapter.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _mix_inputs(n, h, side_h, side_w, tasks, dtype, seed=0):
    from moce_fast.ops.adapter import MixParams

    g = torch.Generator().manual_seed(seed)
    q, r = max(1, h // 4), max(1, h // 2)
    shapes = dict(conv_a=(h, r), conv_b=(r, 9), conv_bias=(h,), amp_w=(h,), amp_b=(h,), pha_w=(h,), pha_b=(h,),
                  comp_w=(h,), comp_b=(), proj1_w=(h // 2, h), proj1_b=(h // 2,), proj2_w=(h, h // 2),
                  proj2_b=(h,), ci1_w=(q, h), ci1_b=(q,), ci2_w=(h, q), ci2_b=(h,), si_w=(h,), si_b=())
    mix = MixParams(**{k: (torch.randn((tasks, *v), generator=g, dtype=torch.float64) * 0.5).to(dtype)
                       .requires_grad_() for k, v in shapes.items()})
    y = torch.randn(n, h, side_h, side_w, generator=g, dtype=torch.float64)
    y[0] = 0  # an all-zero spectrum: |S| = 0 in every bin, where abs and angle have their zero-guarded gradients
    y = y.to(dtype).requires_grad_()
    scale = (torch.rand(n, h, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    shift = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    shift[0] = 0
    shift.requires_grad_()
    task = torch.randint(0, tasks, (n,), generator=g)
    du = torch.randn(n, h, side_h, side_w, generator=g, dtype=torch.float64).to(dtype)
    return y, scale, shift, mix, task, du


def _mix_grads(fn, y, scale, shift, mix, task, du):
    leaves = [y, scale, shift, *mix]
    for t in leaves:
        t.grad = None
    u = fn(y, scale, shift, mix, task)
    u.backward(du)
    return [u.detach()] + [t.grad for t in leaves]


def _composition(y, scale, shift, mix, task):
    from moce_fast.ops import adapter as ops

    single = mix.amp_w.shape[0] == 1
    x = y * scale[:, :, None, None] + shift[:, :, None, None]
    return ops._mix_composition(x, [ops._per_image(p, task, single, y.dtype) for p in mix], single, False)


@pytest.mark.parametrize("n,h,side_h,side_w,tasks", [(3, 8, 6, 6, 1), (2, 8, 7, 5, 1), (4, 12, 8, 9, 2),
                                                     (3, 6, 5, 4, 3), (2, 4, 1, 6, 1), (2, 4, 5, 1, 2)])
@pytest.mark.parametrize("dft", ["dense", "fft"])
def test_mix_function_gradients_equal_autograd_of_the_composition(n, h, side_h, side_w, tasks, dft, monkeypatch):
    # under autograd the torch backend's mix is one Function with a derived backward (complex abs,
    # angle and polar, the rfft2 / irfft2 adjoints with their doubled columns, the gates and pooling;
    # or for small maps the dense DFT products and their transposes); the composition runs torch.fft
    from moce_fast.ops import MixParams, adapter_mix
    from moce_fast.ops import adapter as ops

    if dft == "fft":
        monkeypatch.setattr(ops, "DENSE_DFT_MAX_PIXELS", 0)

    names = ["u", "y", "scale", "shift", *MixParams._fields]
    inputs = _mix_inputs(n, h, side_h, side_w, tasks, torch.float64)
    fast = _mix_grads(adapter_mix, *inputs)
    expect = _mix_grads(_composition, *inputs)
    for name, a, b in zip(names, fast, expect):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        # comp_b's gradient is 0 in exact arithmetic (softmax shift invariance): compared absolutely
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item()), name
    # float32 through the Function against the float64 composition
    fast32 = _mix_grads(adapter_mix, *_mix_inputs(n, h, side_h, side_w, tasks, torch.float32))
    for name, a, b in zip(names, fast32, expect):
        assert (a.double() - b).abs().max() <= 2e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("dft", ["dense", "fft"])
def test_mix_function_gradcheck_float64(dft, monkeypatch):
    from moce_fast.ops import adapter_mix
    from moce_fast.ops import adapter as ops

    if dft == "fft":
        monkeypatch.setattr(ops, "DENSE_DFT_MAX_PIXELS", 0)

    y, scale, shift, mix, task, _ = _mix_inputs(2, 4, 5, 6, 2, torch.float64, seed=3)
    y = y.detach()
    y[0] = torch.randn(y.shape[1:], dtype=torch.float64)  # gradcheck's finite differences need |S| > 0
    y.requires_grad_()

    def f(y, scale, shift, amp_w, pha_w, comp_w, ci2_w):
        m = mix._replace(amp_w=amp_w, pha_w=pha_w, comp_w=comp_w, ci2_w=ci2_w)
        return adapter_mix(y, scale, shift, m, task)

    args = (y, scale, shift, mix.amp_w, mix.pha_w, mix.comp_w, mix.ci2_w)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows,k,m", [(4608, 24, 576), (4608, 576, 24), (5000, 12, 180), (4100, 12, 180),
                                      (300, 24, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_linear_gradients_on_every_path(rows, k, m, bias):
    # the head/tail product under autograd on a CPU: oneDNN's 1x1 conv or a GEMM forward (by shape),
    # a GEMM backward with the weight gradient in either orientation, over 8 row blocks from 4096
    # rows divisible by 8 (4608, 5000) or as one product (4100, 300), or oneDNN's input gradient for
    # a narrow input of a wide output; float32 against float64 autograd of the plain product
    from moce_fast.ops.adapter import _rows_linear

    g = torch.Generator().manual_seed(rows + k)
    x64 = torch.randn(rows, k, generator=g, dtype=torch.float64)
    w64 = torch.randn(m, k, generator=g, dtype=torch.float64) / k ** 0.5
    b64 = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(rows, m, generator=g, dtype=torch.float64)
    leaves32 = [t.float().requires_grad_() for t in (x64, w64, b64) if t is not None]
    leaves64 = [t.clone().requires_grad_() for t in (x64, w64, b64) if t is not None]
    y32 = _rows_linear(*leaves32, *([None] if not bias else []))
    y64 = leaves64[0] @ leaves64[1].t() + (leaves64[2] if bias else 0)
    y32.backward(dy.float()), y64.backward(dy)
    assert rel_err(y32, y64) < 1e-5
    for a, b in zip(leaves32, leaves64):
        assert rel_err(a.grad, b.grad) < 1e-5


@pytest.mark.parametrize("layout,shape", [("nhwc", (0, 4, 4, 56)), ("lnc", (16, 0, 56)), ("nchw", (0, 56, 3, 5))])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_empty_batch_gives_an_empty_result(layout, shape, backend, mode):
    # in training too (the public adapter's FFT fails on an empty batch; torch's BatchNorm returns an
    # empty result): no images, no statistics, as for a task without images in a batch of several
    skip_unless_backend_runs(backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # (interpreter: CPU)
    adapter = getattr(randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)), mode)().to(device)
    stats = [t.clone() for t in adapter.BN.buffers()]
    x = torch.randn(shape, device=device, requires_grad=True)
    with moce_fast.backend(backend):
        y = adapter(x)
        y.sum().backward()
        with torch.no_grad():
            assert adapter(x).shape == x.shape
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(torch.equal(a, b) for a, b in zip(stats, adapter.BN.buffers()))
    assert all(p.grad is None or not p.grad.any() for p in adapter.parameters())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_batch_of_several_tasks_in_training(backend):
    from moce_fast import adapters

    skip_unless_backend_runs(backend)
    host = torch.nn.Sequential(torch.nn.Linear(56, 56))
    adapters.add_adapters(host, r"^0$", dim=56, variant="edt", layout="nhwc", tasks=("a", "b"))
    randomize_(host).train()
    x = torch.randn(0, 4, 4, 56, requires_grad=True)
    with moce_fast.backend(backend), adapters.tasks([]):
        y = host(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    with pytest.raises(ValueError, match="more than one value per channel"):  # (one value: still an error)
        with moce_fast.backend(backend), adapters.tasks(["a"]):
            host(torch.randn(1, 1, 1, 56))


@pytest.mark.parametrize("hh,ww", [(16, 16), (5, 7), (6, 4), (1, 8), (9, 1), (2, 2), (1, 1), (12, 21)])
def test_dft_tables_equal_torch_fft(hh, ww):
    # the dense global branch's matrices: rfft2 and irfft2 (ortho) of (hh, ww) maps as real products
    from moce_fast.ops.adapter import dft_tables

    fwd, inv, nb, s, order = dft_tables(hh, ww, torch.float64, torch.device("cpu"))
    g = torch.Generator().manual_seed(hh * 100 + ww)
    x = torch.randn(3, hh * ww, generator=g, dtype=torch.float64)
    spec = torch.fft.rfft2(x.view(3, hh, ww), norm="ortho").reshape(3, nb)
    parts = x @ fwd.t()  # (3, 2 nb - s): real parts of all bins, then imaginary parts of the first nb - s
    re, im = parts[:, :nb], torch.cat([parts[:, nb:], parts.new_zeros(3, s)], 1)
    assert sorted(order.tolist()) == list(range(nb))  # the table's bin order is a permutation
    assert (re - spec.real[:, order]).abs().max() < 1e-13
    assert (im - spec.imag[:, order]).abs().max() < 1e-13
    assert (spec.imag[:, order[nb - s:]].abs().max() if s else 0) < 1e-13  # the last s bins are self-conjugate
    # the inverse, on a spectrum that is not Hermitian (the adapter's phase map breaks the symmetry)
    z = torch.randn(3, nb, generator=g, dtype=torch.complex128)
    z_ordered = torch.empty_like(z)
    z_ordered[:, order] = z
    want = torch.fft.irfft2(z_ordered.view(3, hh, ww // 2 + 1), s=(hh, ww), norm="ortho").reshape(3, -1)
    got = torch.cat([z.real, z.imag[:, :nb - s]], 1) @ inv
    assert (got - want).abs().max() < 1e-13


@pytest.mark.parametrize("n,h,hh,ww,tasks", [(1, 24, 16, 16, 1), (3, 8, 6, 6, 1), (4, 12, 5, 7, 2), (2, 4, 1, 6, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_global_branch_equals_the_fft_one(n, h, hh, ww, tasks, dtype):
    from moce_fast.ops import adapter as ops

    _, _, _, mix, task, _ = _mix_inputs(n, h, hh, ww, tasks, torch.float64, seed=n + h)
    # random maps (no zero bins: the phase of an exactly zero bin is the sign of its zeros, which
    # no two FFT algorithms share), with every self-conjugate bin a negative real number: its phase
    # is pi exactly (imaginary part +0), and pha_fuse maps pi and -pi to different outputs
    y = torch.randn(n, h, hh, ww, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows = torch.tensor([(-1.0) ** i for i in range(hh)])[:, None]
    cols = torch.tensor([(-1.0) ** j for j in range(ww)])[None, :]
    y -= 3 * (1 + rows * (hh % 2 == 0) + cols * (ww % 2 == 0) + rows * cols * (hh % 2 == 0 and ww % 2 == 0))
    with torch.no_grad():
        p = [ops._per_image(q.detach(), task, tasks == 1, dtype) for q in mix]
        x = y.detach().to(dtype)
        dense = ops._global_branch_dense(x.reshape(n * h, hh * ww).t(), n, h, hh, ww, *p[3:7]).view(n, h, hh, ww)
        dense_pm = ops._global_branch_dense(x.reshape(n * h, hh * ww).t(), n, h, hh, ww, *p[3:7], pixel_major=True)
        fft = ops._global_branch_fft(x, *p[3:7], True)
        ref = ops._global_branch_fft(y.detach(), *[q.double() for q in p[3:7]], True)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel_err(dense, ref) < tol
    assert rel_err(dense_pm.t().reshape(n, h, hh, ww), ref) < tol  # the (pixels, N h) orientation
    assert rel_err(fft, ref) < tol


@pytest.mark.parametrize("layout", ["nchw", "lnc", "nhwc"])
@pytest.mark.parametrize("n", [1, 2])
def test_adaptir_op_with_unfolded_parameters_equals_reference(layout, n):
    # the op itself, as a caller without the module's kept fold calls it: BatchNorm folded per call
    # (at batch 1 into the one-image plan it makes for the call)
    from moce_fast import ops
    from moce_fast.nn.adapter import stack_params

    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)).double().eval()
    with torch.no_grad():
        adapter.BN.running_mean.normal_()
        adapter.BN.running_var.uniform_(0.5, 1.5)
    ref = AdaptIR(56, "edt").double().eval()
    ref.load_state_dict(adapter.state_dict())
    x, xl = _inputs(layout, 56, n=n, side=6)
    with torch.no_grad():
        y, stats = ops.adaptir(xl, layout, stack_params([adapter]), None, False, adapter.BN.eps)
        expected = ref(x)
    if layout == "nhwc":
        expected = expected.permute(0, 2, 3, 1)
    elif layout == "lnc":
        expected = expected.flatten(2).permute(2, 0, 1)
    assert stats is None and y.shape == xl.shape
    assert rel_err(y, expected) < 1e-12


@pytest.mark.parametrize("layout", ["nhwc", "lnc"])
@pytest.mark.parametrize("n", [1, 2])
def test_training_after_inference_mode_calls(n, layout):
    # the task index kept between calls is made outside inference mode even when the first call runs
    # in it (autograd cannot save an inference tensor for the backward); the DFT tables and the tap
    # rows made there serve the training step's dense products and gathers (inputs only, never
    # saved; "lnc" with 2 images: the fused Function's rows for 2 images made from them)
    from moce_fast.ops import adapter as ops

    ops.dft_tables.cache_clear()
    ops._kept_single_task.cache_clear()
    ops._tap_rows.cache_clear()
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)).double().eval()
    side = (6, 7) if layout == "nhwc" else (6, 6)
    x = torch.randn(n, 56, *side, dtype=torch.float64)
    with torch.inference_mode():
        adapter(_to_layout(x, layout).detach())
    ref = AdaptIR(56, "edt").double().train()
    ref.load_state_dict(adapter.state_dict())
    adapter.train()
    xl, x_ref = _to_layout(x, layout), x.clone().requires_grad_()
    y, expected = adapter(xl), ref(x_ref)
    y.sum().backward(), expected.sum().backward()
    assert rel_err(from_layout(y, layout, x.shape), expected) < 1e-12
    assert rel_err(from_layout(xl.grad, layout, x.shape), x_ref.grad) < 1e-10


def test_one_image_path_runs_only_where_torch_runs_both_stages(monkeypatch):
    # the fused torch path at batch 1 stands in for both stages' torch implementations: taken under
    # "torch" (and recorded as torch in last_run), under "auto" on a CPU only where the extension's
    # CPU kernel is not built, never for another backend (on a CPU: triton through its interpreter,
    # when TRITON_INTERPRET=1)
    from moce_fast.nn.adapter import stack_params
    from moce_fast.ops import _backend
    from moce_fast.ops import adapter as ops

    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).eval()
    x = torch.randn(1, 4, 4, 56)
    taken = []
    monkeypatch.setattr(ops, "_adaptir_one_image", lambda *a: taken.append(1) or torch.zeros_like(x))
    # ("auto" on a CPU takes the extension's CPU kernel instead where it is built)
    auto = "torch" if _backend.cpu_runtime_status() is not None else "cpu"
    for name, ran in (("torch", "torch"), ("auto", auto)):
        _backend._LAST_RUN.clear()
        with torch.no_grad(), moce_fast.backend(name):
            adapter(x)
        assert len(taken) == (ran == "torch") and _backend.last_run() == {"adaptir_linear": ran,
                                                                          "adaptir_mix_tail": ran}
        taken.clear()
    with torch.no_grad(), moce_fast.backend("triton"):
        assert not ops._one_image_in_torch(x, stack_params([adapter]))
    assert not taken


def test_one_image_plan_is_made_on_first_use_and_follows_updates():
    # the fold is kept for any batch; the one-image plan is added to it at the first batch-1 call,
    # kept while the parameters are unchanged, and made again (at the next batch-1 call) after an
    # in-place update
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).double().eval()
    ref = AdaptIR(56, "edt").double().eval()
    g = torch.Generator().manual_seed(4)
    for step, n in enumerate([2, 1, 1, 2, 1]):
        if step == 3:
            with torch.no_grad():
                adapter.conv_weight_A.mul_(-1.5)
                adapter.proj[2].bias.add_(1.0)
        ref.load_state_dict(adapter.state_dict())
        x = torch.randn(n, 6, 6, 56, dtype=torch.float64, generator=g)
        with torch.no_grad():
            y, expected = adapter(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert rel_err(y, expected) < 1e-12, step
        plan = adapter.__dict__["_moce_fast_folded"][2]
        assert (plan is None) == (step in (0, 3)), step  # none until a batch-1 call after each (re)fold


def _to_layout(x, layout):
    """(N, C, H, W) ``x`` as a new leaf in ``layout`` (lnc: N = 1 or any, tokens row-major)."""
    if layout == "nhwc":
        x = x.permute(0, 2, 3, 1)
    elif layout == "lnc":
        x = x.flatten(2).permute(2, 0, 1)
    return x.detach().clone(memory_format=torch.contiguous_format).requires_grad_()


def _one_image_training_case(layout, hh, ww, zero=False, seed=0, n=1):
    """conftest.adapter_case (EDT, float64) in training mode, the images in ``layout`` (a leaf) and
    as NCHW (a leaf)."""
    adapter, ref, x = adapter_case(layout, hh, ww, n, zero=zero, seed=seed)
    return adapter.train(), ref.train(), _to_layout(x, layout), x.clone().requires_grad_()


@pytest.mark.parametrize("layout,hh,ww,n", [("nchw", 5, 5, 1), ("lnc", 5, 5, 1), ("nhwc", 5, 5, 1), ("nchw", 3, 7, 1),
                                            ("nhwc", 7, 4, 1), ("nchw", 17, 17, 1), ("lnc", 17, 17, 1),
                                            ("nhwc", 9, 30, 1), ("nhwc", 1, 6, 1), ("nchw", 16, 16, 1),
                                            ("lnc", 5, 5, 3), ("lnc", 16, 16, 4), ("lnc", 1, 1, 4)])
@pytest.mark.parametrize("zero", [False, True])
def test_fused_training_equals_reference(layout, hh, ww, n, zero):
    # training on one image, or on N images of one task in "lnc" on maps up to 256 pixels, runs the
    # whole adapter as one Function (ops.adapter._FusedTrain), rows pixel-major, with a derived
    # backward: dense DFT products and the 3x3 as gathered taps up to 256 pixels (5x5, 3x7, 7x4, 1x6,
    # 16x16, 1x1), torch.fft and the conv beyond (17x17, 9x30); a zero map makes the head output's
    # variance 0 and every spectrum bin 0, where BatchNorm divides by sqrt(eps) and abs and angle
    # have their zero-guarded gradients
    adapter, ref, xl, x = _one_image_training_case(layout, hh, ww, zero, n=n)
    y, expected = adapter(xl), ref(x)
    assert grad_node(y) == "_FusedTrainBackward"
    assert rel_err(from_layout(y, layout, x.shape), expected) < 1e-12
    # the running statistics updated from the image's batch statistics, as the public adapter does
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        got, want = getattr(adapter.BN, name), getattr(ref.BN, name)
        assert (got - want).abs().max() <= 1e-13 * max(1.0, want.abs().max().item()), name
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y.backward(dy), expected.backward(from_layout(dy, layout, x.shape))
    assert rel_err(from_layout(xl.grad, layout, x.shape), x.grad) < 1e-10
    ref_params = dict(ref.named_parameters())
    for name, p in adapter.named_parameters():
        expect = ref_params[name].grad
        assert p.grad.shape == expect.shape, name
        assert (p.grad - expect).abs().max() <= 1e-9 * max(1.0, expect.abs().max().item()), name


@pytest.mark.parametrize("dft,layout", [("dense", "nhwc"), ("fft", "nhwc"), ("dense", "lnc")])
def test_fused_training_gradcheck_float64(dft, layout, monkeypatch):
    # one image (nhwc), and two images in "lnc"
    from moce_fast.ops import adapter as ops

    if dft == "fft":
        monkeypatch.setattr(ops, "DENSE_DFT_MAX_PIXELS", 0)
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)).double().train()
    shape = (1, 4, 5, 56) if layout == "nhwc" else (9, 2, 56)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert grad_node(adapter(x)) == "_FusedTrainBackward"
    names = [name for name, _ in adapter.named_parameters()]

    def functional(x, *values):  # the parameters as gradcheck's inputs too
        return torch.func.functional_call(adapter, dict(zip(names, values)), (x,))

    values = tuple(p.detach().clone().requires_grad_() for p in adapter.parameters())
    assert grad_node(functional(x, *values)) == "_FusedTrainBackward"
    # (the FFT path's float64 depthwise conv is ~10x slower here than the taps: a random projection
    # of its Jacobian, gradcheck's fast mode, in place of the whole one)
    assert torch.autograd.gradcheck(functional, (x, *values), eps=1e-6, atol=1e-6, fast_mode=dft == "fft")


def test_fused_training_op_and_input_without_grad():
    # ops.adaptir on one image with stacked (task-axis) parameters takes the same Function, its
    # parameter gradients in those shapes; an input without requires_grad gets no gradient computed
    from moce_fast.nn.adapter import stack_params
    from moce_fast.ops import adapter as ops

    adapter, ref, xl, x = _one_image_training_case("nhwc", 6, 6)
    p = stack_params([adapter])
    y, stats = ops.adaptir(xl.detach(), "nhwc", p, None, True, adapter.BN.eps)
    assert grad_node(y) == "_FusedTrainBackward"
    expected = ref(x.detach())
    assert rel_err(y.permute(0, 3, 1, 2), expected) < 1e-12
    # the statistics the op returns: the image's head output's mean and unbiased variance
    head = torch.nn.functional.conv2d(x.detach(), adapter.head.weight, adapter.head.bias)
    assert rel_err(stats.mean[0], head.mean(dim=(0, 2, 3))) < 1e-12
    assert rel_err(stats.var[0], head.var(dim=(0, 2, 3))) < 1e-12 and stats.count.tolist() == [36.0]
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy), expected.backward(dy.permute(0, 3, 1, 2))
    ref_params = dict(ref.named_parameters())
    for name, q in adapter.named_parameters():
        assert (q.grad - ref_params[name].grad).abs().max() <= 1e-9 * max(1.0, ref_params[name].grad.abs().max()), name


def test_fused_training_runs_only_where_torch_runs_both_stages():
    from moce_fast.ops import _backend

    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).train()
    x = torch.randn(1, 4, 4, 56, requires_grad=True)
    auto = "torch" if _backend.cpu_runtime_status() is not None else "cpu"  # (the extension's CPU kernel)
    for name, ran in (("torch", "torch"), ("auto", auto)):
        _backend._LAST_RUN.clear()
        with moce_fast.backend(name):
            y = adapter(x)
        assert grad_node(y) == ("_FusedTrainBackward" if ran == "torch" else CPU_TRAIN_NODE)
        assert _backend.last_run() == {"adaptir_linear": ran, "adaptir_mix_tail": ran}
    # not for two images but in "lnc" on a small map whose L and N axes merge, up to 1024 rows
    # (ops.adapter.FUSED_TRAIN_MAX_ROWS), nor for an input in
    # another dtype than the parameters (the staged path promotes), nor bfloat16
    assert grad_node(adapter(torch.randn(2, 4, 4, 56))) != "_FusedTrainBackward"
    lnc = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "lnc")).train()
    assert grad_node(lnc(torch.randn(16, 2, 56))) == "_FusedTrainBackward"
    assert grad_node(lnc(torch.randn(17 * 17, 2, 56))) != "_FusedTrainBackward"  # (FFT size)
    assert grad_node(lnc(torch.randn(256, 5, 56))) != "_FusedTrainBackward"  # (1280 rows)
    assert grad_node(lnc(torch.randn(2, 16, 56).transpose(0, 1))) != "_FusedTrainBackward"
    assert grad_node(adapter(x.double())) != "_FusedTrainBackward"
    assert grad_node(adapter.bfloat16()(x.bfloat16())) != "_FusedTrainBackward"


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("n", [1, 2])
def test_running_statistics_follow_batchnorm_momentum(momentum, n, backend):
    # one adapter's update (three ops; on a CPU where the extension is built, "auto" runs the CPU
    # kernel and its own update, cpu_batch_norm_update) and the stacked one, with a momentum and
    # with the cumulative average (momentum None: 1 / num_batches_tracked), over several steps
    from moce_fast.ops import _backend

    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).double().train()
    ref = AdaptIR(56, "edt").double().train()
    ref.load_state_dict(adapter.state_dict())
    adapter.BN.momentum = ref.BN.momentum = momentum
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(n, 5, 6, 56, dtype=torch.float64, generator=g) * (step + 1) + step
        with moce_fast.backend(backend):
            adapter(x), ref(x.permute(0, 3, 1, 2))
        kernel = backend == "auto" and _backend.cpu_runtime_status() is None
        assert _backend.last_run()["adaptir_linear"] == ("cpu" if kernel else "torch")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            got, want = getattr(adapter.BN, name), getattr(ref.BN, name)
            assert (got - want).abs().max() <= 1e-13 * max(1.0, want.abs().max().item()), (step, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the torch backend's one-image paths "
                                                          "on CUDA tensors)")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-4)])
@pytest.mark.parametrize("layout,side", [("nhwc", 5), ("lnc", 16), ("nchw", 17)])
def test_one_image_paths_on_cuda_with_the_torch_backend(layout, side, dtype, tol, monkeypatch):
    # under backend("torch") a CUDA device runs the same one-image eval path and training Function
    # as a CPU (dense products and taps up to 16x16, torch.fft and the conv beyond); float32 at its
    # own precision (cuDNN's TF32 off, as torch's matmuls are by default)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    adapter, ref, xl, x = _one_image_training_case(layout, side, side)
    adapter.to("cuda", dtype)
    xc = xl.detach().to("cuda", dtype).requires_grad_()
    with moce_fast.backend("torch"):
        y = adapter(xc)
        assert grad_node(y) == "_FusedTrainBackward"
        expected = ref(x)
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        y.backward(dy.to("cuda", dtype)), expected.backward(from_layout(dy, layout, x.shape))
        assert rel_err(from_layout(y.cpu().double(), layout, x.shape), expected) < tol
        assert rel_err(from_layout(xc.grad.cpu().double(), layout, x.shape), x.grad) < tol
        ref_params = dict(ref.named_parameters())
        for name, p in adapter.named_parameters():  # (head.bias, compress.bias: 0 in exact arithmetic)
            expect = ref_params[name].grad
            assert (p.grad.cpu().double() - expect).abs().max() <= tol * 10 * max(1.0, expect.abs().max()), name
        adapter.eval(), ref.eval()
        with torch.no_grad():
            y, expected = adapter(xc), ref(x)
        assert rel_err(from_layout(y.cpu().double(), layout, x.shape), expected) < tol


def _in_memory(x: torch.Tensor, mem: str) -> torch.Tensor:
    """x (N, P, K) with the values kept and the memory in ``mem`` order."""
    if mem == "npm":
        return x.contiguous()
    if mem == "pnm":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("n,p,m,k", [(1, 16, 24, 576), (3, 16, 24, 576), (3, 16, 576, 24), (2, 5, 7, 9)])
def test_pixel_sum_product_any_memory_order_no_wide_copy(n, p, m, k):
    """The weight gradients' sum over images and pixels of a[n, p, m] b[n, p, k], for operands in
    every memory order, equals einsum's in float64; and for the host's token layouts it copies
    nothing as wide as the wide operand (einsum copied the C-wide tokens of an "lnc" batch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moce_fast.ops.adapter import _pixel_sum_product

    g = torch.Generator().manual_seed(n * 1000 + m)
    a = torch.randn(n, p, m, dtype=torch.float64, generator=g)
    b = torch.randn(n, p, k, dtype=torch.float64, generator=g)
    want = torch.einsum("npm,npk->mk", a, b)
    wide = n * p * max(m, k)

    class Copies(TorchDispatchMode):
        sizes: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
                        torch.ops.aten._to_copy.default):
                self.sizes.append(out.numel())
            return out

    for am in ("npm", "pnm", "nmp"):
        for bm in ("npm", "pnm", "nmp"):
            mode = Copies()
            mode.sizes = []
            a_in, b_in = _in_memory(a, am), _in_memory(b, bm)
            with mode:
                got = _pixel_sum_product(a_in, b_in)
            assert got.is_contiguous() and rel_err(got, want) < 1e-13, (am, bm)
            if am == bm and am in ("npm", "pnm") and n * p > 1:
                assert all(s < wide for s in mode.sizes), (am, bm, mode.sizes)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("n,tasks", [(1, 1), (2, 1), (2, 2)])  # torch: the one-image Function, the staged path,
@pytest.mark.parametrize("dy_grad", [True, False])  # the grouped one
def test_higher_order_gradients_are_a_clear_error(backend, n, tasks, dy_grad):
    # Every backend's adapter backward is once differentiable. Under create_graph the first-order
    # gradients are right, and differentiating them again raises an error that names the adapter and
    # what to use instead (not zeros, not torch's generic "marked with @once_differentiable"); also
    # where the upstream gradient does not require grad (autograd.grad's default ones): torch's
    # decorator then gave the adapter's gradients without a graph, and the host's Linear, which has
    # one, made the input gradient require grad anyway, so a gradient penalty ran without the
    # adapter's second-order terms, silently.
    from moce_fast import adapters
    from moce_fast.ops.adapter import HIGHER_ORDER_ERROR

    skip_unless_backend_runs(backend)
    dim, dtype = 56, torch.float32 if backend == "triton" else torch.float64  # (triton: no float64)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # (interpreter: CPU)
    host = torch.nn.Sequential(torch.nn.Linear(dim, dim))
    names = [f"t{i}" for i in range(tasks)]
    adapters.add_adapters(host, r"^0$", dim=dim, variant="edt", layout="nhwc", tasks=names)
    randomize_(host.to(dtype), seed=3).to(device)
    host.train()
    # 9 x 10 pixels: the cpu backend's kernel takes maps of more than 64 (its C++ autograd node)
    x = torch.randn(n, 9, 10, dim, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    dy = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(device)
    params = [p for p in host.parameters() if p.requires_grad]
    per_image = [names[i % tasks] for i in range(n)]

    def grads(create_graph):
        xl = x.clone().requires_grad_()
        with moce_fast.backend(backend), adapters.tasks(per_image):
            y = host(xl)
        if backend == "cpu":
            assert CPU_TRAIN_NODE in graph_nodes(y)
        return torch.autograd.grad(y, [xl, *params], dy.clone().requires_grad_(create_graph and dy_grad),
                                   create_graph=create_graph, allow_unused=True)

    plain = grads(False)
    recorded = grads(True)
    for a, b in zip(plain, recorded):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(b, a) < (1e-6 if dtype == torch.float32 else 1e-12)
    with pytest.raises(RuntimeError, match="once differentiable on every moce_fast backend") as err:
        recorded[0].square().sum().backward()
    assert str(err.value) == HIGHER_ORDER_ERROR


def test_the_reference_math_named_for_higher_order_gradients_has_them():
    # what HIGHER_ORDER_ERROR tells a user to run differentiates twice, correctly
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc"), seed=4).double().eval()
    x = torch.randn(1, 56, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(adapter.forward_nchw, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
