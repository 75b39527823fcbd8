"""The extension's CPU kernel of the whole AdaptIR adapter (csrc/adapter_cpu.cpp, backend "cpu")
against the float64 reference: eval and training (output, every gradient, running statistics),
dense DFT sizes and FFT sizes, one image in each layout and several in "lnc"; outputs poisoned
with NaN before the kernel writes them; gradcheck; which calls it takes; errors on bad arguments;
its products with a narrow side (csrc/cpu_narrow.cpp) alone and in the whole adapter, at each ISA
this CPU has.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import moce_fast
from moce_fast.ops import _backend
from moce_fast.ops import adapter as ops
from moce_fast.reference import AdaptIR
from conftest import (CPU_TRAIN_NODE, adapter_case, assert_grads_close, assert_param_grads_close, from_layout,
                      grad_node, graph_nodes, randomize_, rel_err, to_layout)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("moce_fast._C") is None,
                                reason="moce_fast._C was not built (needs a CUDA build of torch and nvcc)")


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every buffer the kernel fills is NaN before it runs (an element it forgets shows up)."""
    from moce_fast.ops import _cuda

    _cuda.load()
    _cuda.set_poison_outputs(True)
    yield
    _cuda.set_poison_outputs(False)


# (layout, H, W, N): dense DFT tables up to ops.CPU_KERNEL_DENSE_DFT_MAX_PIXELS (64: 8x8 the largest),
# rfft2 / irfft2 beyond (16x16, 17x17, 9x30, 24x20)
SIZES = [("nchw", 5, 5, 1), ("lnc", 5, 5, 1), ("nhwc", 5, 5, 1), ("nchw", 3, 7, 1), ("nhwc", 1, 6, 1),
         ("lnc", 8, 8, 1), ("lnc", 16, 16, 1), ("lnc", 4, 4, 3), ("nhwc", 4, 5, 3), ("nchw", 17, 17, 1), ("nhwc", 9, 30, 1),
         ("lnc", 17, 17, 2), ("nhwc", 17, 17, 2), ("nchw", 24, 20, 1)]
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}  # (output, gradients)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout,hh,ww,n", SIZES)
def test_training_equals_reference(layout, hh, ww, n, dtype):
    # float32 gradients at 1e-4: they pass through 1/|S| and the phase's derivative, which amplify
    # the forward's float32 round-off at small bins (the torch backend in float32 is as far off)
    fast, ref, x = adapter_case(layout, hh, ww, n, dtype)
    fast.train(), ref.train()
    _check_training_step(fast, ref, x, layout, dtype, 9)


def _check_training_step(fast, ref, x, layout, dtype, grad_seed):
    """One training step of ``fast`` on the CPU kernel against the float64 reference ``ref`` on
    images ``x`` (N, C, H, W): output, running statistics, input and parameter gradients."""
    xl = to_layout(x, layout).to(dtype).requires_grad_()
    xr = to_layout(x, layout).requires_grad_()
    with moce_fast.backend("cpu"):
        y = fast(xl)
    assert grad_node(y) == CPU_TRAIN_NODE
    expected = ref(from_layout(xr, layout, x.shape))
    tol_out, tol_grad = TOL[dtype]
    assert rel_err(from_layout(y, layout, x.shape), expected) < tol_out
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        got, want = getattr(fast.BN, name).double(), getattr(ref.BN, name).double()
        assert (got - want).abs().max() <= tol_out * max(1.0, want.abs().max().item()), name
    dy = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(to_layout(dy, layout).to(dtype)), expected.backward(dy)
    assert_grads_close(fast, ref, xl, xr, tol_grad)


@pytest.mark.parametrize("layout,hh,ww,n,variant,dim", [("lnc", 48, 48, 1, "ipt", 576), ("nhwc", 5, 6, 2, "edt", 56)])
def test_parameter_gradients_without_input_gradient(layout, hh, ww, n, variant, dim):
    # x not requiring grad: the kernel's backward skips the input gradient (at IPT's width the head's
    # convolution_backward then gives the weight and bias gradients alone); the parameters'
    # gradients still equal the float64 reference's
    fast, ref, x = adapter_case(layout, hh, ww, n, torch.float32, variant=variant, dim=dim)
    fast.train(), ref.train()
    xl = to_layout(x, layout).float()
    with moce_fast.backend("cpu"):
        y = fast(xl)
    assert grad_node(y) == CPU_TRAIN_NODE
    expected = ref(x)
    dy = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    y.backward(to_layout(dy, layout).float()), expected.backward(dy)
    assert xl.grad is None
    assert_param_grads_close(fast, ref, TOL[torch.float32][1])


@pytest.fixture
def small_chunks():
    """The kernel's parallel loops in chunks of 30 values (7 rows of the tests' 4 hidden channels:
    uneven chunks, many of them on these small maps) for the test, then the default again."""
    from moce_fast.ops import _cuda

    previous = _cuda.set_cpu_chunk_values(30)
    yield
    _cuda.set_cpu_chunk_values(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout,hh,ww,n", [("lnc", 5, 5, 3), ("nchw", 17, 17, 1), ("nhwc", 9, 30, 1),
                                           ("lnc", 17, 17, 2), ("nhwc", 5, 3, 3)])
def test_parallel_chunks_equal_reference(small_chunks, layout, hh, ww, n, threads):
    # dense tables and rfft2 / irfft2; each loop's chunks run on `threads` threads, each reduction's
    # per-chunk partial sums added in chunk order: float64 within the reference's tolerances either way
    fast, ref, x = adapter_case(layout, hh, ww, n, torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast.train(), ref.train()
        _check_training_step(fast, ref, x, layout, torch.float64, 11)
        _check_eval(fast, ref, x, layout, torch.float64)
    finally:
        torch.set_num_threads(previous)


ISA_LEVELS = ("none", "avx2", "avx512")


def _detected_isa():
    from moce_fast.ops import _cuda

    previous = _cuda.set_cpu_isa_cap("avx512")
    try:
        return _cuda.cpu_isa()
    finally:
        _cuda.set_cpu_isa_cap(previous)


@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    """The narrow products (csrc/cpu_narrow.cpp) capped at each ISA in turn, for the test; skipped
    where this CPU lacks that ISA."""
    from moce_fast.ops import _cuda

    _cuda.load()
    if ISA_LEVELS.index(request.param) > ISA_LEVELS.index(_detected_isa()):
        pytest.skip(f"needs a CPU with {request.param} (this one has {_detected_isa()})")
    previous = _cuda.set_cpu_isa_cap(request.param)
    assert _cuda.cpu_isa() == request.param
    yield request.param
    _cuda.set_cpu_isa_cap(previous)


# (rows, K, M, bias): w (M, K). Narrow outputs (M <= 32 < K): each register block (M rounded up to 8:
# 8, 16, 24, 32), M not a multiple of 8, one output, rows fewer than a block and not a multiple of one
# (12 rows with AVX-512, 3-8 with AVX2), IPT's 576 -> 24 on 2305 rows (a part per thread), a long K.
# Narrow inputs (K <= 32 < M): M not a multiple of 16, fewer than 64 columns (one partial block), several
# blocks of 64, K = 1 and 32, more than 96 rows (several row blocks) not a multiple of 6, IPT's 24 -> 576.
NARROW_PRODUCTS = [(1, 180, 12, True), (37, 180, 12, True), (4099, 180, 12, False), (33, 56, 4, True),
                   (5, 33, 1, False), (9, 100, 13, True), (50, 128, 32, True), (12, 40, 8, False),
                   (25, 40, 20, True), (13, 64, 24, True), (2305, 576, 24, True), (7, 5000, 3, False),
                   (37, 12, 180, False), (5, 4, 56, True), (7, 1, 33, False), (21, 3, 200, True),
                   (11, 32, 128, True), (203, 24, 576, False), (2305, 24, 576, True), (6, 7, 64, True)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("rows,k,m,bias", NARROW_PRODUCTS)
def test_narrow_products_equal_reference(isa, rows, k, m, bias, strided):
    # the extension's own loops against float64 on random rows (contiguous, or rows of K values 7
    # apart more, as an image's rows of a batch), output poisoned: narrow outputs from AVX2, narrow
    # inputs from AVX-512; below those (and "none") no narrow product is offered
    from moce_fast import _C

    g = torch.Generator().manual_seed(rows * 1000 + k * 10 + m)
    x = torch.randn(rows, k + 7, generator=g)[:, 3:3 + k] if strided else torch.randn(rows, k, generator=g)
    w = torch.randn(m, k, generator=g)
    b = torch.randn(m, generator=g) if bias else None
    y = _C.cpu_narrow_rows_times(x, w, b)
    offered = isa == "avx512" or (isa == "avx2" and m <= 32)
    if not offered:
        assert y is None
        return
    want = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert y.dtype == torch.float32 and y.shape == (rows, m)
    assert rel_err(y, want) < 1e-6


# (rows, p, q): a (R, p), b (R, q), one side narrow. IPT's and EDT's weight gradients (the head's narrow
# side on the left, the tail's on the right), rows fewer than a chunk (128), several chunks and one
# part per thread, a last partial one; q or p not a multiple of 16 or of 32 (masked loads and stores),
# more than 12 narrow columns (two groups), one narrow column, 32.
NARROW_T_PRODUCTS = [(2304, 24, 576), (2304, 576, 24), (4099, 12, 180), (4099, 180, 12), (1, 24, 576),
                     (127, 13, 33), (129, 33, 13), (300, 1, 40), (300, 32, 47), (37, 20, 100)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("rows,p,q", NARROW_T_PRODUCTS)
def test_narrow_t_products_equal_reference(isa, rows, p, q, strided):
    # the weight gradients' a^T b on the extension's loop (AVX-512 only) against float64; None below it
    from moce_fast import _C

    g = torch.Generator().manual_seed(rows * 1000 + p * 10 + q)

    def rand(width):
        return torch.randn(rows, width + 5, generator=g)[:, 2:2 + width] if strided else torch.randn(rows, width, generator=g)

    a, b = rand(p), rand(q)
    y = _C.cpu_narrow_t_product(a, b)
    if isa != "avx512":
        assert y is None
        return
    want = a.double().t() @ b.double()
    assert y.dtype == torch.float32 and y.shape == (p, q) and y.is_contiguous()
    assert rel_err(y, want) < 1e-6


@pytest.mark.parametrize("threads", [1, 3])
def test_narrow_products_on_other_thread_counts(threads):
    # the loops split the rows into one part per thread (the products' parts aligned to their register
    # blocks, the weight gradient's partial sums added in part order): 1 thread, and 3 on this 2-core
    # machine (uneven parts, the last one shorter)
    from moce_fast import _C

    if _detected_isa() != "avx512":
        pytest.skip(f"needs a CPU with avx512 (this one has {_detected_isa()})")
    g = torch.Generator().manual_seed(threads)
    x, w, b = torch.randn(2305, 576, generator=g), torch.randn(24, 576, generator=g), torch.randn(24, generator=g)
    u, dy = torch.randn(2305, 24, generator=g), torch.randn(2305, 576, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        head, tail = _C.cpu_narrow_rows_times(x, w, b), _C.cpu_narrow_rows_times(u, w.t())
        dw, dwt = _C.cpu_narrow_t_product(u, x), _C.cpu_narrow_t_product(dy, u)
    finally:
        torch.set_num_threads(previous)
    assert rel_err(head, x.double() @ w.double().t() + b.double()) < 1e-6
    assert rel_err(tail, u.double() @ w.double()) < 1e-6
    assert rel_err(dw, u.double().t() @ x.double()) < 1e-6
    assert rel_err(dwt, dy.double().t() @ u.double()) < 1e-6


def test_narrow_products_decline_other_inputs():
    # float64, non-contiguous rows, no narrow side or two narrow sides: None (the kernel then takes
    # ATen's products); an unknown ISA cap is an error naming the choices
    from moce_fast import _C
    from moce_fast.ops import _cuda

    x, w = torch.randn(40, 180), torch.randn(12, 180)
    if _detected_isa() != "none":
        assert _C.cpu_narrow_rows_times(x, w) is not None
    if _detected_isa() == "avx512":
        assert _C.cpu_narrow_t_product(x, torch.randn(40, 12)) is not None
    assert _C.cpu_narrow_rows_times(x.double(), w.double()) is None
    assert _C.cpu_narrow_rows_times(torch.randn(180, 40).t(), w) is None
    assert _C.cpu_narrow_rows_times(torch.randn(40, 64), torch.randn(48, 64)) is None
    assert _C.cpu_narrow_rows_times(torch.randn(40, 24), torch.randn(24, 24)) is None
    for a, b in ((x.double(), torch.randn(40, 12).double()), (torch.randn(180, 40).t(), torch.randn(40, 12)),
                 (x, torch.randn(40, 64)), (torch.randn(40, 12), torch.randn(40, 24)), (x, torch.randn(41, 12))):
        assert _C.cpu_narrow_t_product(a, b) is None
    with pytest.raises(ValueError, match="isa: expected 'avx512', 'avx2' or 'none', got 'sse'"):
        _cuda.set_cpu_isa_cap("sse")
    with pytest.raises(RuntimeError, match="expected \"avx512\", \"avx2\" or \"none\", got \"sse\""):
        _C.set_cpu_isa_cap("sse")


def test_narrow_kind_is_what_the_products_take(isa):
    # cpu_narrow_kind (what Python asks, e.g. for the eval row limit) says a product is taken exactly
    # where cpu_narrow_rows_times takes it, at each ISA: a narrow output (EDT's and IPT's heads) from
    # AVX2, a narrow input (their tails) only with AVX-512, any length of the wide side; float64, no
    # narrow side and two narrow sides never
    from moce_fast import _C
    from moce_fast.ops import _cuda

    level = ISA_LEVELS.index(isa)
    out, into = "narrow_out" if level >= 1 else None, "narrow_in" if level >= 2 else None
    expected = {(180, 12): out, (12, 180): into, (64, 64): None, (576, 24): out, (24, 576): into,
                (4097, 1): out, (1, 4097): into, (24, 24): None, (33, 32): out, (32, 33): into}
    for (k, m), kind in expected.items():
        assert _cuda.cpu_narrow_kind(torch.float32, k, m) == kind, (k, m)
        assert _cuda.cpu_narrow_kind(torch.float64, k, m) is None, (k, m)
        taken = _C.cpu_narrow_rows_times(torch.randn(3, k), torch.randn(m, k))
        assert (taken is not None) == (kind is not None), (k, m)


@pytest.mark.parametrize("layout,hh,ww,n", [("nhwc", 17, 17, 2), ("lnc", 5, 5, 3), ("nchw", 9, 30, 1)])
def test_isa_caps_equal_reference(isa, layout, hh, ww, n):
    # the whole adapter in float32 (EDT-like, 56 <-> 4: both products narrow where the ISA allows;
    # "nchw"'s rows are a transposed view, which takes ATen's) at each ISA: training and eval
    fast, ref, x = adapter_case(layout, hh, ww, n, torch.float32)
    fast.train(), ref.train()
    _check_training_step(fast, ref, x, layout, torch.float32, 15)
    _check_eval(fast, ref, x, layout, torch.float32)


@pytest.mark.parametrize("layout,hh,ww,n,variant,dim", [("nhwc", 32, 64, 2, "edt", 128), ("lnc", 16, 16, 16, "ipt", 576),
                                                        ("lnc", 16, 16, 8, "ipt", 576), ("nhwc", 32, 32, 2, "edt", 128)])
def test_many_rows_products_equal_reference(isa, layout, hh, ww, n, variant, dim):
    # with AVX-512 every product on the C-wide rows (the head and tail, both input gradients, both
    # weight gradients) runs on the extension's narrow loops: no oneDNN convolution, no bmm. Below it
    # (AVX2: the narrow-output loop only, for the head and du; "none": ATen's) from 4096 float32 rows
    # the wide products run as oneDNN's 1x1 convolution (EDT-like 128 <-> 9: the tail and the input
    # gradient; IPT-like 576 <-> 24: the head too where no narrow loop takes it) and the narrow weight
    # gradients (128 channels) as row-block products in one bmm; from 2048 rows the convolution runs
    # where a side is 512 or wider (IPT), the rest on MKL; the tail's weight gradient and du, and at
    # IPT's width the head's gradients, come from one convolution_backward each; training and eval
    # against float64.
    rows = n * hh * ww
    fast, ref, x = adapter_case(layout, hh, ww, n, torch.float32, variant=variant, dim=dim)
    fast.train(), ref.train()
    probe, xl = copy.deepcopy(fast), to_layout(x, layout).float().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, moce_fast.backend("cpu"):
        probe(xl).backward(torch.randn_like(xl))
    ran = {e.key for e in prof.key_averages()}
    narrow = isa == "avx512"
    assert ("aten::convolution" in ran) == ((rows >= 4096 or dim >= 512) and not narrow), sorted(ran)
    assert ("aten::bmm" in ran) == (rows >= 4096 and dim < 384 and not narrow), sorted(ran)
    backward_convs = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward")
    assert backward_convs == (0 if narrow else 2 if dim >= 512 else 1 if rows >= 4096 else 0), backward_convs
    _check_training_step(fast, ref, x, layout, torch.float32, 12)
    _check_eval(fast, ref, x, layout, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout,hh,ww,n", SIZES)
def test_eval_equals_reference(layout, hh, ww, n, dtype):
    fast, ref, x = adapter_case(layout, hh, ww, n, dtype)
    _check_eval(fast, ref, x, layout, dtype)


def _check_eval(fast, ref, x, layout, dtype):
    """``fast`` in eval on the CPU kernel (recorded as "cpu") against the float64 reference ``ref``
    on images ``x`` (N, C, H, W) in ``dtype``: the output's dtype, shape and values."""
    fast.eval(), ref.eval()
    _backend._LAST_RUN.clear()
    with torch.no_grad(), moce_fast.backend("cpu"):
        y = fast(to_layout(x, layout).to(dtype))
    assert _backend.last_run() == {"adaptir_linear": "cpu", "adaptir_mix_tail": "cpu"}
    assert y.dtype == dtype and y.shape == to_layout(x, layout).shape
    assert rel_err(from_layout(y, layout, x.shape), ref(x)) < TOL[dtype][0]


@pytest.mark.parametrize("layout,hh,ww,n", [("nhwc", 4, 4, 1), ("lnc", 3, 3, 2), ("nhwc", 3, 3, 2), ("nchw", 17, 17, 1)])
def test_zero_map(layout, hh, ww, n):
    # variance 0 (BatchNorm divides by sqrt(eps)) and every spectrum bin 0 (abs and angle take their
    # zero-guarded gradients: none flows through 1/|S|)
    fast, ref, x = adapter_case(layout, hh, ww, n, torch.float64, zero=True)
    fast.train(), ref.train()
    xl = to_layout(x, layout).requires_grad_()
    xr = to_layout(x, layout).requires_grad_()
    with moce_fast.backend("cpu"):
        y = fast(xl)
    expected = ref(from_layout(xr, layout, x.shape))
    assert torch.isfinite(y).all() and rel_err(from_layout(y, layout, x.shape), expected) < 1e-12
    dy = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y.backward(to_layout(dy, layout)), expected.backward(dy)
    assert rel_err(xl.grad, xr.grad) < 1e-10
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():  # (some are 0 in exact arithmetic here: an absolute floor)
        expect = ref_params[name].grad
        assert (p.grad - expect).abs().max() <= 1e-10 * max(1.0, expect.abs().max().item()), name


@pytest.mark.parametrize("layout,shape", [("nhwc", (1, 4, 5, 56)), ("lnc", (9, 2, 56)), ("nhwc", (2, 3, 4, 56)),
                                          ("nchw", (1, 56, 17, 17))])
def test_gradcheck_float64(layout, shape):
    # dense tables (one image; two images in "lnc" and "nhwc") and rfft2 / irfft2 (17x17, fast mode: a
    # random projection of the Jacobian)
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)).double().train()
    names = [name for name, _ in adapter.named_parameters()]

    def functional(x, *values):
        with moce_fast.backend("cpu"):
            return torch.func.functional_call(adapter, dict(zip(names, values)), (x,))

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    values = tuple(p.detach().clone().requires_grad_() for p in adapter.parameters())
    assert grad_node(functional(x, *values)) == CPU_TRAIN_NODE
    assert torch.autograd.gradcheck(functional, (x, *values), eps=1e-6, atol=1e-6, fast_mode=shape[-1] == 17)


def test_auto_takes_the_kernel_on_cpu_and_torch_does_not():
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).train()
    x = torch.randn(1, 4, 4, 56, requires_grad=True)
    for name, node, ran in (("auto", CPU_TRAIN_NODE, "cpu"), ("cpu", CPU_TRAIN_NODE, "cpu"),
                            ("torch", "_FusedTrainBackward", "torch")):
        _backend._LAST_RUN.clear()
        with moce_fast.backend(name):
            y = adapter(x)
        assert grad_node(y) == node, name
        assert _backend.last_run() == {"adaptir_linear": ran, "adaptir_mix_tail": ran}, name


def test_calls_the_kernel_does_not_take_run_torch(monkeypatch):
    # under backend("cpu"), a call the kernel does not take runs the torch implementation (recorded
    # as torch): more rows than the training row limit, several images in "nchw", bfloat16, an input
    # in another dtype than the parameters, eval with autograd recording
    lnc = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "lnc")).train()
    nhwc = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).train()
    nchw = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nchw")).train()
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING", 32)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING_NARROW", 32)
    cases = [(lnc, torch.randn(16, 3, 56)), (nchw, torch.randn(2, 56, 4, 4)), (nhwc, torch.randn(1, 4, 4, 56).double()),
             (lnc, torch.randn(2, 16, 56).transpose(0, 1)),  # (L and N axes that do not merge)
             (nhwc, torch.randn(3, 4, 4, 56))]
    with moce_fast.backend("cpu"):
        for adapter, x in cases:
            _backend._LAST_RUN.clear()
            y = adapter(x.requires_grad_())
            assert grad_node(y) != CPU_TRAIN_NODE, x.shape
            assert set(_backend.last_run().values()) == {"torch"}, x.shape
        _backend._LAST_RUN.clear()
        assert grad_node(lnc(torch.randn(16, 2, 56))) == CPU_TRAIN_NODE  # (32 rows)
        assert set(_backend.last_run().values()) == {"cpu"}
        assert grad_node(nhwc(torch.randn(2, 4, 4, 56))) == CPU_TRAIN_NODE
        assert set(_backend.last_run().values()) == {"cpu"}
        bf = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).bfloat16().train()
        _backend._LAST_RUN.clear()
        bf(torch.randn(1, 4, 4, 56, dtype=torch.bfloat16))
        assert set(_backend.last_run().values()) == {"torch"}
        # eval while autograd records (an input that requires grad): the torch path, differentiable
        nhwc.eval()
        x = torch.randn(1, 4, 4, 56, requires_grad=True)
        y = nhwc(x)
        assert y.grad_fn is not None and set(_backend.last_run().values()) == {"torch"}
        with torch.no_grad():
            assert torch.allclose(nhwc(x), y, rtol=1e-5, atol=1e-6)
        assert set(_backend.last_run().values()) == {"cpu"}
        # eval has its own row limit
        lnc.eval()
        monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL", 32)
        monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL_NARROW", 32)
        with torch.no_grad():
            lnc(torch.randn(16, 2, 56))
            assert set(_backend.last_run().values()) == {"cpu"}
            lnc(torch.randn(16, 3, 56))
            assert set(_backend.last_run().values()) == {"torch"}


def test_dense_dft_tables_only_up_to_their_pixel_limit():
    # the kernel's global branch: dense DFT tables on maps of at most CPU_KERNEL_DENSE_DFT_MAX_PIXELS
    # (8x8), rfft2 / irfft2 beyond (empty tables, nb bins, no self-conjugate count); both equal the
    # float64 reference (SIZES), so only the choice is checked here
    assert ops.CPU_KERNEL_DENSE_DFT_MAX_PIXELS == 64
    fwd, inv, nb, s = ops._kernel_tables(8, 8, torch.float32)
    assert fwd.shape == inv.shape == (2 * nb - s, 64) and (nb, s) == (8 * 5, 4)
    for hh, ww in [(16, 16), (9, 8), (1, 65)]:
        fwd, inv, nb, s = ops._kernel_tables(hh, ww, torch.float32)
        assert fwd.numel() == inv.numel() == 0 and (nb, s) == (hh * (ww // 2 + 1), 0), (hh, ww)


def test_training_row_limit_of_narrow_adapters(monkeypatch):
    # in training, a float32 adapter whose head and tail both run on the narrow products takes the
    # kernel up to CPU_KERNEL_MAX_ROWS_TRAINING_NARROW rows; in float64, with 40 hidden channels, or
    # with the ISA capped at AVX2, up to CPU_KERNEL_MAX_ROWS_TRAINING: on the full path (4x4 maps,
    # which have dense DFT tables) and on the direct call (9x9 maps), the same rule
    from moce_fast.ops import _cuda

    if _detected_isa() != "avx512":
        pytest.skip(f"needs a CPU with avx512 (this one has {_detected_isa()})")
    edt = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "lnc")).train()
    wide = randomize_(moce_fast.AdaptIRAdapter(960, "ipt", "lnc")).train()

    def ran(module, t):
        _backend._LAST_RUN.clear()
        with moce_fast.backend("cpu"):
            module(t)
        return set(_backend.last_run().values())

    for side in (4, 9):
        p = side * side
        monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING", p)
        monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING_NARROW", 2 * p)
        assert ran(edt, torch.randn(p, 2, 56)) == {"cpu"}, side
        assert ran(edt, torch.randn(p, 3, 56)) == {"torch"}, side
        assert ran(copy.deepcopy(edt).double(), torch.randn(p, 2, 56, dtype=torch.float64)) == {"torch"}, side
        assert ran(wide, torch.randn(p, 2, 960)) == {"torch"}, side
        assert ran(wide, torch.randn(p, 1, 960)) == {"cpu"}, side
        previous = _cuda.set_cpu_isa_cap("avx2")
        try:
            assert ran(edt, torch.randn(p, 2, 56)) == {"torch"}, side
        finally:
            _cuda.set_cpu_isa_cap(previous)
    # the direct call alone (where it declines, the full path above still takes the kernel)
    from moce_fast.nn.adapter import _raw_tensors

    def direct(module, t, wide_limit, narrow_limit):
        twin = copy.deepcopy(module)
        return _cuda.cpu_train_call(t, _raw_tensors(twin), twin.BN.num_batches_tracked, 1, twin.BN.eps,
                                    twin.BN.momentum, wide_limit, narrow_limit, 64)

    x = torch.randn(81, 2, 56)
    assert direct(edt, x, 81, 162) is not None and direct(edt, x, 162, 81) is None
    assert direct(copy.deepcopy(edt).double(), x.double(), 81, 162) is None
    assert direct(copy.deepcopy(edt).double(), x.double(), 162, 81) is not None
    assert direct(wide, torch.randn(81, 2, 960), 81, 162) is None
    assert direct(wide, torch.randn(81, 2, 960), 162, 81) is not None


def test_eval_row_limit_of_narrow_adapters(monkeypatch):
    # in eval, a float32 adapter whose head and tail both run on the narrow products (a hidden width
    # of at most 32, AVX-512: EDT's and IPT's) takes the kernel up to CPU_KERNEL_MAX_ROWS_EVAL_NARROW
    # rows; in float64, with 40 hidden channels (IPT at 960), or with the ISA capped at AVX2, up to
    # CPU_KERNEL_MAX_ROWS_EVAL; the same values
    from moce_fast.ops import _cuda

    if _detected_isa() != "avx512":
        pytest.skip(f"needs a CPU with avx512 (this one has {_detected_isa()})")
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL", 16)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL_NARROW", 32)
    edt = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "lnc")).eval()
    ipt = randomize_(moce_fast.AdaptIRAdapter(576, "ipt", "lnc")).eval()
    wide = randomize_(moce_fast.AdaptIRAdapter(960, "ipt", "lnc")).eval()
    x = torch.randn(16, 2, 56)  # 32 rows

    def ran(module, t):
        _backend._LAST_RUN.clear()
        with torch.no_grad(), moce_fast.backend("cpu"):
            y = module(t)
        return y, set(_backend.last_run().values())

    y, where = ran(edt, x)
    assert where == {"cpu"}
    assert ran(edt, torch.randn(16, 3, 56))[1] == {"torch"}
    assert ran(copy.deepcopy(edt).double(), x.double())[1] == {"torch"}
    assert ran(ipt, torch.randn(16, 2, 576))[1] == {"cpu"}
    assert ran(ipt, torch.randn(16, 3, 576))[1] == {"torch"}
    assert ran(wide, torch.randn(16, 2, 960))[1] == {"torch"}
    assert ran(wide, torch.randn(16, 1, 960))[1] == {"cpu"}
    previous = _cuda.set_cpu_isa_cap("avx2")
    try:
        y_torch, where = ran(edt, x)
    finally:
        _cuda.set_cpu_isa_cap(previous)
    assert where == {"torch"}
    assert rel_err(y, y_torch) < 1e-5
    # several tasks in one batch: the limit per task's rows (here 2 images of 16 rows each)
    from moce_fast import adapters

    host = torch.nn.Sequential(torch.nn.Identity())
    adapters.add_adapters(host, r"^0$", 56, variant="edt", layout="lnc", tasks=("a", "b"))
    for i, a in enumerate(host[0].adapters.values()):
        randomize_(a, seed=i)
    host.eval()
    for names, expected in ((["a", "b", "a", "b"], {"cpu"}), (["a", "b", "a", "a"], {"torch"})):
        _backend._LAST_RUN.clear()
        with torch.no_grad(), moce_fast.backend("cpu"), adapters.tasks(names):
            host(torch.randn(16, 4, 56))
        assert set(_backend.last_run().values()) == expected, names


def test_parameter_changed_in_place_before_backward_is_an_error():
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).train()
    y = adapter(torch.randn(1, 4, 4, 56))
    assert grad_node(y) == CPU_TRAIN_NODE
    with torch.no_grad():
        adapter.amp_fuse.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_parameters_the_kernel_does_not_take():
    # each parameter in x's dtype, on its device, contiguous; in eval, nothing requiring grad under
    # grad mode: otherwise the reason names what was found
    from moce_fast.nn.adapter import _assemble, _raw_tensors

    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc"))
    params = [q.detach() for q in ops._cpu_params(_assemble(_raw_tensors(adapter)))]
    x = torch.randn(1, 4, 4, 56)
    assert ops._cpu_params_reason(x, params, False) is None
    assert ops._cpu_params_reason(x.double(), params, True) == \
        "a parameter is torch.float32 on cpu, not contiguous torch.float64 on x's device"
    for i in (0, len(params) - 1):
        strided = list(params)
        strided[i] = params[i].transpose(0, 1).contiguous().transpose(0, 1)  # the same values, strided
        assert not strided[i].is_contiguous()
        assert ops._cpu_params_reason(x, strided, True) == \
            "a parameter is torch.float32 on cpu, not contiguous torch.float32 on x's device", i
    grads = list(params)
    grads[3] = params[3].clone().requires_grad_()
    assert ops._cpu_params_reason(x, grads, False) == "eval with autograd recording (the eval kernel has no backward)"
    assert ops._cpu_params_reason(x, grads, True) is None
    if torch.cuda.is_available():
        moved = list(params)
        moved[5] = params[5].cuda()
        assert "on cuda:0" in ops._cpu_params_reason(x, moved, True)


def test_inputs_the_kernel_does_not_take():
    # the extension's one rule for x (input_reason: the eval plan and the direct training call
    # decline by it, the full path's cpu_kernel_reason reports it): each message names what was found
    from moce_fast.ops import _cuda

    def reason(t, layout, c=56, batch_in_place=False):
        return _cuda.cpu_map_reason(t, ops._LAYOUT_CODE[layout], c, batch_in_place)

    nhwc, lnc, nchw = torch.randn(2, 4, 4, 56), torch.randn(16, 2, 56), torch.randn(1, 56, 4, 4)
    for t, layout in ((nhwc, "nhwc"), (lnc, "lnc"), (nchw, "nchw"), (nhwc.double(), "nhwc")):
        assert reason(t, layout) is None, layout
        assert reason(t, layout, batch_in_place=True) is None, layout
    assert reason(nhwc.half(), "nhwc") == "x is torch.float16, the kernel runs float32 and float64"
    assert reason(nhwc.to(torch.bfloat16), "nhwc") == "x is torch.bfloat16, the kernel runs float32 and float64"
    assert reason(nhwc.to("meta"), "nhwc") == "x is on meta, the kernel runs on the CPU"
    assert reason(torch.randn(0, 4, 4, 56), "nhwc") == "x is empty"
    assert reason(torch.randn(16, 0, 56), "lnc") == "x is empty"
    assert reason(nhwc, "nhwc", c=48) == "x has 56 channels, the adapter 48"
    assert reason(nchw, "nchw", c=4) == "x has 56 channels, the adapter 4"
    assert reason(nhwc, "lnc") == "x has 4 dimensions, layout 'lnc' has 3"
    assert reason(lnc, "nhwc") == "x has 3 dimensions, layout 'nhwc' has 4"
    assert reason(torch.randn(15, 1, 56), "lnc") == "x's L = 15 is not a square"
    several = "images in layout '{}' (several images only in 'nhwc', or in 'lnc' with mergeable L and N axes)"
    apart = torch.randn(2, 16, 56).transpose(0, 1)  # (L, N, C) whose L and N axes do not merge
    assert reason(apart, "lnc") == "2 " + several.format("lnc")
    assert reason(torch.randn(3, 56, 4, 4), "nchw") == "3 " + several.format("nchw")
    # the several-tasks kernel reads each image's block of the batch in place, in any layout
    assert reason(apart, "lnc", batch_in_place=True) is None
    assert reason(torch.randn(3, 56, 4, 4), "nchw", batch_in_place=True) is None
    with pytest.raises(RuntimeError, match=r"layout: expected 0 \(nchw\), 1 \(lnc\) or 2 \(nhwc\), got 3"):
        _cuda.cpu_map_reason(nhwc, 3, 56)
    # the full path reports the same rule, then its own (row limits, parameters)
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc"))
    params = [q.detach() for q in ops._cpu_params(moce_fast.nn.adapter._assemble(
        moce_fast.nn.adapter._raw_tensors(adapter)))]
    assert ops.cpu_kernel_reason(nhwc.half(), "nhwc", params, True) == reason(nhwc.half(), "nhwc")
    assert ops.cpu_kernel_reason(apart, "lnc", params, False) == reason(apart, "lnc")
    assert ops.cpu_kernel_reason(nhwc, "nhwc", params, True) is None


def _kernel_plan(adapter):
    """The adapter's kept eval plan of the CPU kernel (moce_fast._C.AdapterEvalPlan), or None."""
    from moce_fast.nn.adapter import _CPU_PLANS

    return _CPU_PLANS.get(adapter)


def _full_path_fails(monkeypatch):
    """From here on an adapter call that does not run on its kept plan fails (AdaptIRAdapter.forward
    takes its full path through run_adapters)."""
    from moce_fast.nn import adapter as nn_adapter

    def full_path(*args, **kwargs):
        raise AssertionError("the call took the full path, not the kept plan")

    monkeypatch.setattr(nn_adapter, "run_adapters", full_path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout,hh,ww,n", [("nchw", 5, 5, 1), ("lnc", 8, 8, 1), ("lnc", 16, 16, 1), ("lnc", 4, 4, 3),
                                            ("nhwc", 4, 5, 3), ("nhwc", 9, 30, 1), ("nchw", 17, 17, 1)])
def test_eval_plan_runs_later_calls(monkeypatch, layout, hh, ww, n, dtype):
    # an eval call the kernel runs keeps a plan; later calls on new inputs of the same map run on it
    # alone (the full path would fail), recorded as cpu, into poisoned buffers, equal to the
    # float64 reference; a map of another size the plan's tables do not serve makes a new plan
    fast, ref, x = adapter_case(layout, hh, ww, n, dtype)
    assert _kernel_plan(fast) is None
    _check_eval(fast, ref, x, layout, dtype)
    plan = _kernel_plan(fast)
    assert plan is not None
    with monkeypatch.context() as m:
        _full_path_fails(m)
        for seed in (1, 2):
            x2 = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            _check_eval(fast, ref, x2, layout, dtype)
    assert _kernel_plan(fast) is plan
    dense = hh * ww <= ops.CPU_KERNEL_DENSE_DFT_MAX_PIXELS
    other = torch.randn(n, 56, 3, 3, dtype=torch.float64) if dense else torch.randn(n, 56, 12, 12, dtype=torch.float64)
    _check_eval(fast, ref, other, layout, dtype)
    assert (_kernel_plan(fast) is plan) == (not dense)  # (an FFT plan serves any map beyond the tables' limit)


def _replace_data(adapter):
    # the same tensor object, its version unchanged, on new memory (nn.Module.to / .double() do this
    # to every parameter)
    w = adapter.compress.weight
    version = w._version
    w.data = w.data * -2.0
    assert w._version == version


def _at_version(new, old):
    """``new`` with ``old``'s version (in-place no-ops): only its identity tells them apart."""
    while new._version < old._version:
        new.add_(0.0)
    assert new._version == old._version
    return new


def _replace_parameter(adapter):
    old = adapter.tail.weight
    adapter.tail.weight = torch.nn.Parameter(_at_version(old.detach() * 0.5 + 0.1, old))


def _replace_submodule(adapter):
    old = adapter.proj[0]
    new = copy.deepcopy(old)
    new.weight.copy_(old.weight.flip(0))
    _at_version(new.weight, old.weight), _at_version(new.bias, old.bias)
    adapter.proj[0] = new


PLAN_CHANGES = {
    "in place": lambda a: a.amp_fuse.weight.mul_(-1.5),
    "running statistics": lambda a: a.BN.running_var.mul_(3.0),
    "load_state_dict": lambda a: a.load_state_dict(randomize_(copy.deepcopy(a), seed=7).state_dict()),
    "data replaced": _replace_data,
    "parameter replaced": _replace_parameter,
    "submodule replaced": _replace_submodule,
    "eps": lambda a: setattr(a.BN, "eps", 0.25),
}


@pytest.mark.parametrize("change", list(PLAN_CHANGES))
@pytest.mark.parametrize("layout,hh,ww,n", [("nhwc", 5, 5, 2), ("lnc", 12, 12, 1)])
def test_eval_plan_follows_changes_to_the_adapter(change, layout, hh, ww, n):
    # after each change the kept plan no longer holds: the call takes the full path (the new
    # parameters, folded again), which keeps a new plan; the stale one is let go
    from moce_fast.nn.adapter import _raw_tensors

    fast, ref, x = adapter_case(layout, hh, ww, n)
    _check_eval(fast, ref, x, layout, torch.float64)
    stale = _kernel_plan(fast)
    with torch.no_grad():
        PLAN_CHANGES[change](fast)
    ref.load_state_dict(fast.state_dict())
    ref.BN.eps = fast.BN.eps
    assert not stale.holds(_raw_tensors(fast), ops._LAYOUT_CODE[layout], fast.BN.eps)
    _check_eval(fast, ref, x, layout, torch.float64)
    assert _kernel_plan(fast) is not stale and _kernel_plan(fast) is not None


def test_eval_plan_declines_what_the_full_path_decides(monkeypatch):
    # a kept plan runs only an eval call outside autograd under the cpu or auto backend, of at most
    # the row limit in force at the call; otherwise the full path decides as without a plan
    fast, ref, x = adapter_case("lnc", 4, 4, 2)  # (16, 2, 56): 32 rows
    _check_eval(fast, ref, x, "lnc", torch.float64)
    assert _kernel_plan(fast) is not None
    xl = to_layout(x, "lnc")
    with torch.no_grad():
        expected = fast(xl)

    def ran(t):
        _backend._LAST_RUN.clear()
        return fast(t), set(_backend.last_run().values())

    with torch.no_grad(), moce_fast.backend("torch"):
        y, where = ran(xl)
    assert where == {"torch"} and rel_err(y, expected) < 1e-12
    y, where = ran(xl.detach().requires_grad_())  # eval under autograd: differentiable, by torch
    assert where == {"torch"} and y.grad_fn is not None and rel_err(y, expected) < 1e-12
    fast.head.weight.requires_grad_(True)
    with torch.enable_grad():
        y, where = ran(xl)
    assert where == {"torch"} and y.grad_fn is not None
    fast.train()  # training: batch statistics (and their running update), not the plan's folded ones
    before = fast.BN.running_mean.clone()
    with torch.no_grad():
        y, where = ran(xl)
    assert where == {"cpu"} and not torch.equal(fast.BN.running_mean, before)
    assert rel_err(y, expected) > 1e-3
    fast.eval()
    ref.load_state_dict(fast.state_dict())  # (the train call moved the running statistics: a new plan)
    _check_eval(fast, ref, x, "lnc", torch.float64)
    plan = _kernel_plan(fast)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL", 16)  # (the limits in force at each call)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL_NARROW", 16)
    with torch.no_grad():
        y, where = ran(xl)
    assert where == {"torch"} and _kernel_plan(fast) is plan
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL", 32)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL_NARROW", 32)
    with monkeypatch.context() as m:
        _full_path_fails(m)
        _check_eval(fast, ref, x, "lnc", torch.float64)
    # bad input still gets the full path's clear errors
    with torch.no_grad():
        with pytest.raises(ValueError, match="expected 56 channels"):
            fast(torch.randn(16, 2, 57, dtype=torch.float64))
        with pytest.raises(ValueError, match="square token grid"):
            fast(torch.randn(15, 2, 56, dtype=torch.float64))
        with pytest.raises(ValueError, match="floating-point tensor"):
            fast(xl.long())


@pytest.mark.parametrize("layout", ["lnc", "nhwc", "nchw"])
def test_eval_plan_takes_what_the_full_path_takes(monkeypatch, layout):
    # the plan's checks in C++ and the full path's (cpu_kernel_reason: the same C++ rule for x, then
    # the row limits and the parameters' rule through Python) agree: on each input, the plan runs
    # exactly where the full path would take the kernel (dtype, empty, several images by layout, L
    # and N axes that do not merge, the row limits in force), and then equals the full path's output
    from moce_fast.nn.adapter import _raw_tensors, folded_params

    fast, ref, x = adapter_case(layout, 12, 12, 1, torch.float32)  # (an FFT plan: any map beyond 8x8)
    _check_eval(fast, ref, x, layout, torch.float32)
    plan = _kernel_plan(fast)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL", 600)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL_NARROW", 600)
    g = torch.Generator().manual_seed(5)

    def images(n, side=12, dtype=torch.float32):
        return to_layout(torch.randn(n, 56, side, side, generator=g, dtype=torch.float64), layout).to(dtype)

    inputs = [images(1), images(1, 10), images(1, dtype=torch.float64), images(0), images(2), images(4), images(5),
              images(1).detach().requires_grad_()]
    if layout == "lnc":
        inputs.append(torch.randn(3, 144, 56, generator=g).transpose(0, 1))  # (L and N axes that do not merge)
    raw, code = _raw_tensors(fast), ops._LAYOUT_CODE[layout]
    taken = 0
    with torch.no_grad():
        for t in inputs:
            params, _ = folded_params([fast], torch.promote_types(t.dtype, torch.float32), fast.BN.eps)
            why = ops.cpu_kernel_reason(t, layout, ops._cpu_params(params), False)
            out = plan.run(t, raw, code, fast.BN.eps, ops.CPU_KERNEL_MAX_ROWS_EVAL,
                           ops.CPU_KERNEL_MAX_ROWS_EVAL_NARROW)
            assert (out is None) == (why is not None), (tuple(t.shape), t.dtype, why)
            if out is not None:
                taken += 1
                with moce_fast.backend("torch"):
                    assert rel_err(out, fast(t)) < 1e-5, tuple(t.shape)
    assert taken >= 3  # (1 and 10 side maps, and the batches the layout and the limit allow)


def test_eval_plan_inference_mode_and_copies():
    # a plan made outside inference mode does not run inside it (its folded tensors are not
    # inference tensors there), nor one made inside outside it; each call equals the reference.
    # The plan is kept beside the module: the adapter still deep-copies and pickles.
    import io

    fast, ref, x = adapter_case("nhwc", 5, 5, 2)
    _check_eval(fast, ref, x, "nhwc", torch.float64)
    first = _kernel_plan(fast)
    with torch.inference_mode():
        _check_eval(fast, ref, x, "nhwc", torch.float64)
    inside = _kernel_plan(fast)
    assert inside is not first
    _check_eval(fast, ref, x, "nhwc", torch.float64)
    assert _kernel_plan(fast) is not inside
    twin = copy.deepcopy(fast)
    assert _kernel_plan(twin) is None
    _check_eval(twin, ref, x, "nhwc", torch.float64)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _check_eval(loaded, ref, x, "nhwc", torch.float64)


def test_eval_plan_bad_arguments_are_clear_errors():
    from moce_fast.nn.adapter import _raw_tensors, stack_params
    from moce_fast.ops import _cuda

    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).eval()
    raw = _raw_tensors(adapter)
    with torch.no_grad():
        params = ops._cpu_params(ops.fold_batch_norm(stack_params([adapter]), 1e-5, torch.float32))
    fwd, inv, _, s = ops._kernel_tables(4, 4, torch.float32)
    plan_type = _cuda.eval_plan_type()
    plan_type(raw, params, 2, 1e-5, fwd, inv, 4, 4, s, 64)  # (as made)
    with pytest.raises(RuntimeError, match="params: expected 24 tensors, got 23"):
        plan_type(raw, params[:-1], 2, 1e-5, fwd, inv, 4, 4, s, 64)
    with pytest.raises(RuntimeError, match="layout: expected 0 \\(nchw\\), 1 \\(lnc\\) or 2 \\(nhwc\\), got 3"):
        plan_type(raw, params, 3, 1e-5, fwd, inv, 4, 4, s, 64)
    with pytest.raises(RuntimeError, match="fwd, inv: expected the DFT tables of a map of at most 64 pixels"):
        plan_type(raw, params, 2, 1e-5, ops._NO_TABLE, ops._NO_TABLE, 4, 4, 0, 64)
    with pytest.raises(RuntimeError, match="tail_w: expected a contiguous Float tensor"):
        plan_type(raw, params[:-1] + [params[-1].double()], 2, 1e-5, fwd, inv, 4, 4, s, 64)
    with torch.inference_mode():
        frozen = [t.clone() for t in raw]
    with pytest.raises(RuntimeError, match="raw: tensor 0 has no storage or version counter"):
        plan_type(frozen, params, 2, 1e-5, fwd, inv, 4, 4, s, 64)


def test_batch_norm_update_bad_arguments_are_clear_errors():
    from moce_fast.ops import _cuda

    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.zeros((), dtype=torch.int64)
    mean, var = torch.randn(4), torch.rand(4)
    _cuda.cpu_batch_norm_update(rm, rv, nbt, mean, var, None)  # (as made: the cumulative average of one batch)
    assert torch.equal(rm, mean) and torch.equal(rv, var) and nbt.item() == 1
    with pytest.raises(RuntimeError, match="running_var: expected a CPU floating-point tensor of 4 values"):
        _cuda.cpu_batch_norm_update(rm, torch.ones(5), nbt, mean, var, 0.1)
    with pytest.raises(RuntimeError, match="num_batches_tracked: expected a CPU int64 tensor of one value"):
        _cuda.cpu_batch_norm_update(rm, rv, nbt.float(), mean, var, 0.1)
    assert nbt.item() == 1  # (nothing updated by a refused call)


def test_backend_cpu_needs_the_extension_and_cpu_tensors(monkeypatch):
    from moce_fast.ops import _cuda

    monkeypatch.setattr(_cuda, "unavailable_reason", lambda: "the extension moce_fast._C was not built")
    with pytest.raises(moce_fast.BackendUnavailableError, match="'cpu' cannot run here: the extension"):
        moce_fast.backend("cpu")
    # "auto" then runs torch on a CPU, recorded as such
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).train()
    _backend._LAST_RUN.clear()
    assert grad_node(adapter(torch.randn(1, 4, 4, 56))) == "_FusedTrainBackward"
    assert set(_backend.last_run().values()) == {"torch"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (backend 'cpu' refusing CUDA tensors)")
def test_backend_cpu_refuses_cuda_tensors():
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).cuda().eval()
    with moce_fast.backend("cpu"), torch.no_grad(), pytest.raises(moce_fast.BackendUnavailableError,
                                                                    match="'cpu' runs CPU tensors only"):
        adapter(torch.randn(2, 4, 4, 56, device="cuda"))


def _op_args(dtype=torch.float32):
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).to(dtype)
    from moce_fast.nn.adapter import _assemble, _raw_tensors

    params = ops._cpu_params(_assemble(_raw_tensors(adapter)))
    fwd, inv, nb, s = ops._kernel_tables(4, 4, dtype)
    return torch.randn(1, 4, 4, 56, dtype=dtype), params, fwd, inv, nb, s


def test_bad_arguments_are_clear_errors():
    op = torch.ops.moce_fast.adaptir_rows
    x, params, fwd, inv, nb, s = _op_args()

    def call(**kw):
        a = dict(x=x, layout=2, hh=4, ww=4, n=1, params=params, fwd=fwd, inv=inv, nb=nb, s=s, training=True, eps=1e-5)
        a.update(kw)
        return op(*a.values())

    assert call()[0].shape == x.shape
    cases = [(dict(params=params[:-1]), "params: expected 24 tensors, got 23"),
             (dict(params=[params[0].double()] + params[1:]), "head_w: expected a contiguous Float tensor"),
             (dict(params=params[:7] + [torch.ones(5)] + params[8:]), "amp_w: expected 4 elements"),
             (dict(x=x.double()), "head_w: expected a contiguous Double tensor"),
             (dict(x=x.to(torch.bfloat16)), "x: expected float32 or float64"),
             (dict(layout=3), "layout: expected 0 .nchw., 1 .lnc. or 2 .nhwc., got 3"),
             (dict(hh=5), "x: expected 20 pixel rows of 56 channels"),
             (dict(layout=0, n=2), "n: more than one image only in the lnc and nhwc layouts"),
             (dict(nb=3), "nb: expected 12 bins of a 4x4 map, got 3"),
             (dict(fwd=fwd[:-1]), "fwd: expected a contiguous"),
             (dict(inv=torch.empty(0)), "inv: expected a contiguous")]
    for kw, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**kw)
    with pytest.raises(RuntimeError, match="BatchNorm in training needs more than one value per channel"):
        call(x=torch.randn(1, 1, 1, 56), hh=1, ww=1, nb=1, s=1, fwd=ops._kernel_tables(1, 1, torch.float32)[0],
             inv=ops._kernel_tables(1, 1, torch.float32)[1])


def test_backward_bad_arguments_are_clear_errors():
    x, params, fwd, inv, nb, s = _op_args()
    res = torch.ops.moce_fast.adaptir_rows(x, 2, 4, 4, 1, params, fwd, inv, nb, s, True, 1e-5)
    back = torch.ops.moce_fast.adaptir_rows_backward
    dout = torch.randn_like(x)
    assert len(back(dout, x, 2, 4, 4, 1, params, res[3:], fwd, inv, nb, s, True)) == 25
    with pytest.raises(RuntimeError, match="dout: expected the output's shape"):
        back(dout[..., :5], x, 2, 4, 4, 1, params, res[3:], fwd, inv, nb, s, True)
    with pytest.raises(RuntimeError, match="saved: expected the 18 tensors the forward kept, got 17"):
        back(dout, x, 2, 4, 4, 1, params, res[3:-1], fwd, inv, nb, s, True)
    with pytest.raises(RuntimeError, match="saved: expected contiguous Float tensors"):
        back(dout, x, 2, 4, 4, 1, params, [t.double() for t in res[3:]], fwd, inv, nb, s, True)


# ------------------------------------------------------------------ several tasks in one batch

def _task_site(layout, dtype, seed=30):
    """A host site with three tasks' adapters (random weights, running statistics and phase maps)
    and their float64 references."""
    from moce_fast import adapters

    host = torch.nn.Sequential(torch.nn.Identity())
    adapters.add_adapters(host, r"^0$", 56, variant="edt", layout=layout, tasks=("a", "b", "c"))
    refs = {}
    for i, (name, ad) in enumerate(host[0].adapters.items()):
        randomize_(ad, seed=seed + i)
        with torch.no_grad():
            ad.pha_fuse.weight.uniform_(0.5, 1.5)
            ad.BN.running_mean.normal_()
            ad.BN.running_var.uniform_(0.5, 1.5)
        refs[name] = AdaptIR(56, "edt").double()
        refs[name].exact_phase = True
        refs[name].load_state_dict(ad.state_dict())
    return host.to(dtype), refs


# (layout, H, W): dense tables and rfft2 / irfft2 (17x17); each layout's images read and written in
# the batch, image by image
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout,hh,ww", [("lnc", 4, 4), ("nhwc", 5, 3), ("nchw", 4, 6), ("lnc", 17, 17)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_several_tasks_one_call_equal_each_reference(isa, mode, layout, hh, ww, dtype):
    """Three tasks' adapters at one site, task "c" absent from the batch: one kernel call per
    direction (the Function's node), each image equal to its task's float64 reference, in training
    each task's BatchNorm on its own images (running statistics), every gradient equal to the
    references', zero gradients and unmoved statistics for the absent task. At each ISA: in float32
    "lnc" and "nhwc" the per-image products run on the narrow loops, on strided rows."""
    from moce_fast import adapters

    host, refs = _task_site(layout, dtype)
    getattr(host, mode)()
    names = ["b", "a", "b", "b", "a"]
    x = torch.randn(len(names), 56, hh, ww, dtype=torch.float64, generator=torch.Generator().manual_seed(31))
    xl = to_layout(x, layout).to(dtype).clone().requires_grad_(mode == "train")
    _backend._LAST_RUN.clear()
    with moce_fast.backend("cpu"), adapters.tasks(names), torch.set_grad_enabled(mode == "train"):
        y = host(xl) - xl  # the Identity host adds x
    assert _backend.last_run() == {"adaptir_linear": "cpu", "adaptir_mix_tail": "cpu"}
    tol_out, tol_grad = TOL[dtype]
    got = from_layout(y, layout, x.shape)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(32))
    if mode == "train":
        assert CPU_TRAIN_NODE in graph_nodes(y) and "StackBackward0" not in graph_nodes(y)
        (got * dy.to(dtype)).sum().backward()
    site = host[0].adapters
    for task in "ab":
        idx = [i for i, n in enumerate(names) if n == task]
        ref = getattr(refs[task], mode)()
        xr = x[idx].detach().clone().requires_grad_()
        expected = ref(xr)
        assert rel_err(got[idx].detach(), expected) < tol_out, task
        if mode == "eval":
            continue
        expected.backward(dy[idx])
        assert rel_err(from_layout(xl.grad, layout, x.shape)[idx], xr.grad) < tol_grad, task
        assert_param_grads_close(site[task], ref, tol_grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert rel_err(getattr(site[task].BN, name).double(), getattr(ref.BN, name).double()) < tol_out, name
    absent = site["c"]
    if mode == "train":
        assert all(p.grad is not None and not p.grad.any() for p in absent.parameters())
    assert absent.BN.num_batches_tracked.item() == 0
    assert torch.equal(absent.BN.running_mean.double(), refs["c"].BN.running_mean)


@pytest.mark.parametrize("layout", ["nhwc", "lnc", "nchw"])
def test_several_tasks_strided_batch(layout):
    """The kernel reads each task's images from the batch in place and writes the output and the
    input gradient there: a batch with strides of another layout (and a strided upstream gradient)
    gives what its contiguous copy gives, in training with every gradient."""
    from moce_fast import adapters

    host, _ = _task_site(layout, torch.float64)
    host.train()
    names = ["b", "a", "b", "a"]
    base = torch.randn(4, 56, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(33))
    # nhwc and lnc: views of the (N, C, H, W) batch; nchw: channel-major across images
    strided = {"nhwc": base.permute(0, 2, 3, 1), "lnc": base.flatten(2).permute(2, 0, 1),
               "nchw": base.transpose(0, 1).contiguous().transpose(0, 1)}[layout]
    assert not strided.is_contiguous()
    results = []
    for x in (strided, strided.contiguous()):
        x = x.detach().clone() if x.is_contiguous() else x.detach()
        x.requires_grad_()
        for p in host.parameters():
            p.grad = None
        state = copy.deepcopy(host.state_dict())
        dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(34))
        with moce_fast.backend("cpu"), adapters.tasks(names):
            y = host(x)
        assert CPU_TRAIN_NODE in graph_nodes(y)
        y.backward(dy.transpose(0, 1).contiguous().transpose(0, 1))  # a strided upstream gradient
        results.append((y.detach(), x.grad, [p.grad for p in host.parameters()]))
        host.load_state_dict(state)  # the same running statistics for the second call
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert rel_err(y0, y1) < 1e-12 and rel_err(dx0, dx1) < 1e-12
    # (absolute below 1: the head's bias and compress's bias have gradients that are 0 up to rounding)
    assert all(((a - b).abs().max() <= 1e-12 * (1 + b.abs().max())).item() for a, b in zip(g0, g1))


def test_several_tasks_gradcheck_float64():
    from moce_fast import adapters

    host, _ = _task_site("nhwc", torch.float64)
    host.train()
    x = torch.randn(3, 3, 4, 56, dtype=torch.float64, requires_grad=True)
    with moce_fast.backend("cpu"), adapters.tasks(["c", "a", "c"]):
        assert CPU_TRAIN_NODE in graph_nodes(host(x))
        assert torch.autograd.gradcheck(lambda t: host(t), (x,), eps=1e-6, atol=1e-6)


def test_several_tasks_the_kernel_does_not_take_run_torch(monkeypatch):
    """A task with more rows than the kernel's limit sends the whole batch to the torch grouped
    path (recorded as torch), with the same values."""
    from moce_fast import adapters

    host, refs = _task_site("lnc", torch.float32)
    host.train()
    names = ["a", "b", "a"]
    x = torch.randn(16, 3, 56)
    with moce_fast.backend("cpu"), adapters.tasks(names), torch.no_grad():
        host.eval()
        kernel = host(x)
        monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL", 31)  # task "a": 2 images x 16 pixels
        monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_EVAL_NARROW", 31)
        _backend._LAST_RUN.clear()
        staged = host(x)
    assert _backend.last_run() == {"adaptir_linear": "torch", "adaptir_mix_tail": "torch"}
    assert rel_err(staged, kernel) < 1e-5


def test_several_tasks_bad_arguments_are_clear_errors():
    x, params, fwd, inv, nb, s = _op_args()  # one image 4x4, "nhwc"
    op = torch.ops.moce_fast.adaptir_rows_tasks
    x2 = torch.cat([x, x])
    task = torch.tensor([1, 0])
    assert op(x2, 2, 4, 4, params + params, task, fwd, inv, nb, s, True, 1e-5)[0].shape == x2.shape
    cases = [(dict(params=params + params[:-1]), "params: expected 24 tensors per task, got 47"),
             (dict(task=torch.tensor([0, 2])), "task: image 1 has task 2, expected 0..1"),
             (dict(task=torch.tensor([0])), "task: expected a CPU int64 tensor of 2 task indices"),
             (dict(task=torch.tensor([0.0, 1.0])), "task: expected a CPU int64 tensor"),
             (dict(hh=5), "x: expected 2 images of 5x4 pixels and 56 channels"),
             (dict(layout=3), "layout: expected 0 .nchw., 1 .lnc. or 2 .nhwc., got 3")]
    for kw, message in cases:
        a = dict(x=x2, layout=2, hh=4, ww=4, params=params + params, task=task, fwd=fwd, inv=inv, nb=nb, s=s,
                 training=True, eps=1e-5)
        a.update(kw)
        with pytest.raises(RuntimeError, match=message):
            op(*a.values())
    res = op(x2, 2, 4, 4, params + params, task, fwd, inv, nb, s, True, 1e-5)
    back = torch.ops.moce_fast.adaptir_rows_tasks_backward
    assert len(back(torch.randn_like(x2), x2, 2, 4, 4, params + params, task, res[4:], fwd, inv, nb, s, True)) == 49
    with pytest.raises(RuntimeError, match="saved: expected the 18 tensors the forward kept for each of the 2 tasks"):
        back(torch.randn_like(x2), x2, 2, 4, 4, params + params, task, res[4:-1], fwd, inv, nb, s, True)


# ---------------------------------------------------------------- the CPU buffer cache
# (csrc/cpu_cache.cpp): blocks of 1 MiB or more (here the output and the input gradient: 24x24 maps
# of 2 images at 240 channels, or one 32x32 map at 256, 1.1 and 1.05 MB in float32) come back from it
# on the next step


@pytest.fixture
def cache_limit():
    """The cache at its default limit for the test, empty before and after."""
    from moce_fast import ops as mops

    before = mops.cpu_cache_info()["limit_bytes"] >> 20
    mops.set_cpu_cache_limit(256)
    mops.empty_cpu_cache()
    yield mops
    mops.set_cpu_cache_limit(before)
    mops.empty_cpu_cache()


@pytest.mark.parametrize("layout,n", [("lnc", 2), ("nhwc", 1), ("nchw", 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cached_buffers_steps_equal_reference(cache_limit, layout, n, dtype):
    # three training steps on fresh inputs: the second and third take the blocks the first gave back
    # (NaN-poisoned again when handed out), each step against the float64 reference
    dim, side = (240, 24) if layout == "lnc" else (256, 32)
    fast, ref, _ = adapter_case(layout, side, side, n, dtype, dim=dim)
    fast.train(), ref.train()
    hits = [cache_limit.cpu_cache_info()["hits"]]  # (counted since the process started)
    for step in range(3):
        x = torch.randn(n, dim, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for m in (fast, ref):
            m.zero_grad(set_to_none=True)
        _check_training_step(fast, ref, x, layout, dtype, 10 + step)
        hits.append(cache_limit.cpu_cache_info()["hits"])
    steps = [b - a for a, b in zip(hits, hits[1:])]
    assert steps[0] == 0 and steps[1] >= 2 and steps[2] >= 2, f"the output and the input gradient of steps 2 and 3 " \
                                                                 f"come from the cache: {steps} hits per step"


def test_backward_allocations_come_from_the_cache(cache_limit):
    # the kernel's backward runs with the cache installed: buffers ATen makes inside it come from the
    # cache too (here the input gradient, from the head's convolution_backward at IPT's width), so the
    # input gradient, freed, is an idle block of the cache (a heap that a host's other work churned
    # gave those buffers fresh pages, a page fault per 4 KiB)
    fast = randomize_(moce_fast.AdaptIRAdapter(576, "ipt", "lnc")).train()
    x = torch.randn(2304, 1, 576, requires_grad=True)
    _backend._LAST_RUN.clear()
    with moce_fast.backend("cpu"):
        fast(x).backward(torch.randn(2304, 1, 576))
    assert _backend.last_run() == {"adaptir_linear": "cpu", "adaptir_mix_tail": "cpu"}
    cache_limit.empty_cpu_cache()  # (the forward's buffers, idle since the step)
    assert x.grad is not None and cache_limit.cpu_cache_info()["idle_bytes"] == 0
    x.grad = None
    info = cache_limit.cpu_cache_info()
    assert info["idle_blocks"] >= 1 and info["idle_bytes"] >= 2304 * 576 * 4, info


@pytest.mark.parametrize("mode", ["eval plan", "direct training"])
def test_forward_allocations_come_from_the_cache(monkeypatch, cache_limit, mode):
    # the kept eval plan and the direct training call run the kernel with the cache installed:
    # buffers ATen makes inside the forward come from the cache too (here the output itself, from
    # the tail's oneDNN convolution at IPT's width), so the output, freed, is an idle block of the
    # cache (measured without it, a process whose glibc mmap threshold no host work had raised took
    # ~590 page faults per IPT 48x48 batch-1 eval call, 2.9 against 2.0 ms)
    fast = randomize_(moce_fast.AdaptIRAdapter(576, "ipt", "lnc")).train(mode == "direct training")
    x = torch.randn(2304, 1, 576)
    with torch.no_grad(), moce_fast.backend("cpu"):
        fast(x)  # (the full path: it makes the eval plan)
        _full_path_fails(monkeypatch)
        y = fast(x)
    assert _backend.last_run() == {"adaptir_linear": "cpu", "adaptir_mix_tail": "cpu"}
    cache_limit.empty_cpu_cache()  # (the call's other buffers, idle since)
    assert cache_limit.cpu_cache_info()["idle_bytes"] == 0
    del y
    info = cache_limit.cpu_cache_info()
    assert info["idle_blocks"] == 1 and info["idle_bytes"] >= 2304 * 576 * 4, info


def test_cached_block_is_never_shared_while_alive(cache_limit):
    # an output kept alive keeps its block: the next call's output is another block, the first
    # output's values are untouched; when it dies its block is idle, and handed out again
    fast = randomize_(moce_fast.AdaptIRAdapter(240, "edt", "lnc")).eval()
    x1, x2 = torch.randn(576, 2, 240), torch.randn(576, 2, 240)
    with torch.no_grad(), moce_fast.backend("cpu"):
        y1 = fast(x1)
        kept = y1.clone()
        y2 = fast(x2)
        assert y1.data_ptr() != y2.data_ptr()
        assert torch.equal(y1, kept)
        ptr = y1.data_ptr()
        assert cache_limit.cpu_cache_info()["idle_blocks"] == 0
        del y1
        info = cache_limit.cpu_cache_info()
        assert info["idle_blocks"] == 1 and info["idle_bytes"] >= 576 * 2 * 240 * 4, info
        y3 = fast(x1)
        assert y3.data_ptr() == ptr and torch.equal(y3, kept)
        assert cache_limit.cpu_cache_info()["idle_blocks"] == 0


def test_cache_limit_and_empty(cache_limit):
    fast = randomize_(moce_fast.AdaptIRAdapter(240, "edt", "lnc")).eval()
    x = torch.randn(576, 2, 240)
    with torch.no_grad(), moce_fast.backend("cpu"):
        fast(x)  # (dies at once: its block is idle)
        assert cache_limit.cpu_cache_info()["idle_blocks"] == 1
        cache_limit.empty_cpu_cache()
        assert cache_limit.cpu_cache_info()["idle_bytes"] == 0
        cache_limit.set_cpu_cache_limit(0)  # off: a dying block is freed, not kept
        before = cache_limit.cpu_cache_info()
        fast(x), fast(x)
        info = cache_limit.cpu_cache_info()
        assert info["idle_bytes"] == 0 and info["hits"] == before["hits"] and info["misses"] == before["misses"] + 2, \
            info
        cache_limit.set_cpu_cache_limit(1)  # below the block's size: freed too
        fast(x)
        assert cache_limit.cpu_cache_info()["idle_bytes"] == 0
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="limit_mib: expected a whole number of MiB >= 0"):
            cache_limit.set_cpu_cache_limit(bad)


def test_cache_frees_the_blocks_given_back_longest_ago(cache_limit):
    # at the limit, a block given back is kept and the idle ones given back longest ago are freed to
    # make room (blocks of sizes no longer asked for make way for those in use); a block larger than
    # the limit itself is freed; a smaller limit frees the oldest first
    from moce_fast.ops import _cuda

    mib = 1 << 20
    cache_limit.set_cpu_cache_limit(5)

    def cycle(nbytes):  # a block of nbytes from the cache, given back at once; (hits, misses) added
        before = cache_limit.cpu_cache_info()
        with _cuda.cpu_cache_installed(torch.empty(1)):
            block = torch.empty(nbytes // 4)
        del block
        after = cache_limit.cpu_cache_info()
        return after["hits"] - before["hits"], after["misses"] - before["misses"]

    def idle():
        info = cache_limit.cpu_cache_info()
        return info["idle_blocks"], info["idle_bytes"] // mib

    assert cycle(2 * mib) == (0, 1) and cycle(3 * mib) == (0, 1) and idle() == (2, 5)
    assert cycle(2 * mib) == (1, 0) and idle() == (2, 5)  # (now 2 MiB is the one given back last)
    assert cycle(4 * mib) == (0, 1) and idle() == (1, 4)  # both older blocks freed to make room
    assert cycle(4 * mib) == (1, 0) and cycle(3 * mib) == (0, 1) and idle() == (1, 3)
    assert cycle(6 * mib) == (0, 1) and idle() == (1, 3)  # larger than the limit: freed, the rest kept
    assert cycle(2 * mib) == (0, 1) and idle() == (2, 5)
    cache_limit.set_cpu_cache_limit(2)  # the 3 MiB block, given back before the 2 MiB one, goes
    assert idle() == (1, 2) and cycle(2 * mib) == (1, 0)


def test_cache_limit_from_environment():
    import subprocess
    import sys

    code = "import moce_fast.ops as o; print(o.cpu_cache_info()['limit_bytes'])"
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**__import__("os").environ, "MOCE_FAST_CPU_CACHE_MB": value})
    ok = run("64")
    assert ok.returncode == 0 and ok.stdout.strip() == str(64 << 20), ok.stderr
    bad = run("lots")
    assert bad.returncode != 0 and "MOCE_FAST_CPU_CACHE_MB: expected a whole number of MiB >= 0, got 'lots'" in bad.stderr


def test_cache_installed_as_torch_cpu_allocator(cache_limit):
    # while installed, torch's own CPU allocations of 1 MiB or more come from the cache (and go back
    # to it), smaller ones and everything after the scope closes do not; oneDNN's raw allocations
    # (a convolution) work through it; nested scopes count; an error inside still closes the scope
    from moce_fast.ops import _cuda

    ext = _cuda.load()
    x = torch.randn(1, 64, 48, 48)
    w = torch.randn(64, 64, 1, 1)
    expected = torch.nn.functional.conv2d(x, w)
    assert ext.cpu_cache_install_depth() == 0
    with _cuda.cpu_cache_installed(x):
        with _cuda.cpu_cache_installed(x):
            assert ext.cpu_cache_install_depth() == 2
        assert ext.cpu_cache_install_depth() == 1
        before = cache_limit.cpu_cache_info()
        big = torch.empty(1 << 19)  # 2 MiB
        torch.empty(1 << 10)  # 4 KiB: not the cache's
        assert cache_limit.cpu_cache_info()["misses"] == before["misses"] + 1
        del big
        assert cache_limit.cpu_cache_info()["idle_blocks"] == before["idle_blocks"] + 1
        again = torch.empty(1 << 19)
        assert cache_limit.cpu_cache_info()["hits"] == before["hits"] + 1
        got = torch.nn.functional.conv2d(x, w)  # (oneDNN: raw_allocate / raw_deallocate)
        assert torch.equal(got, expected)
    assert ext.cpu_cache_install_depth() == 0
    after = cache_limit.cpu_cache_info()
    torch.empty(1 << 19)
    assert cache_limit.cpu_cache_info()["misses"] == after["misses"]
    del again  # (a block of the cache, dying after the scope closed: back to the cache)
    assert cache_limit.cpu_cache_info()["idle_blocks"] == after["idle_blocks"] + 1
    with pytest.raises(RuntimeError, match="boom"):
        with _cuda.cpu_cache_installed(x):
            raise RuntimeError("boom")
    assert ext.cpu_cache_install_depth() == 0
    with pytest.raises(RuntimeError, match="uninstall_cpu_cache: the cache is not installed"):
        ext.uninstall_cpu_cache()


def test_adapter_torch_path_allocates_from_the_cache(cache_limit):
    # several "nchw" images in training run the torch backend's path (not the kernel), inside the
    # scope: its big buffers come from the cache (a hit from the second step on), and the output and
    # gradients still equal the float64 reference
    fast, ref, _ = adapter_case("nchw", 32, 32, 2, torch.float32, dim=256)
    fast.train(), ref.train()
    hits = [cache_limit.cpu_cache_info()["hits"]]
    for step in range(2):
        x = torch.randn(2, 256, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for m in (fast, ref):
            m.zero_grad(set_to_none=True)
        xl = to_layout(x, "nchw").float().requires_grad_()
        xr = to_layout(x, "nchw").requires_grad_()
        _backend._LAST_RUN.clear()
        with moce_fast.backend("cpu"):
            y = fast(xl)
        assert set(_backend.last_run().values()) == {"torch"}
        hits.append(cache_limit.cpu_cache_info()["hits"])
        expected = ref(from_layout(xr, "nchw", x.shape))
        assert rel_err(from_layout(y, "nchw", x.shape), expected) < TOL[torch.float32][0]
        dy = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        y.backward(to_layout(dy, "nchw").float()), expected.backward(dy)
        assert_grads_close(fast, ref, xl, xr, TOL[torch.float32][1])
        del y, xl
    # (the output, 2 MiB, is the one buffer of the forward that lives past it and is at least the
    # cache's 1 MiB at this size)
    assert hits[2] - hits[1] >= 1, f"the second step's forward took blocks from the cache: {hits}"


# ------------------------------------------------------------ the training call straight from C++


def _full_path_spy(monkeypatch) -> list:
    """A list that gets an entry for each adapter call that takes the full path (run_adapters)
    rather than moce_fast._C.cpu_train_call or a kept eval plan; the full path still runs."""
    from moce_fast.nn import adapter as nn_adapter

    calls, full = [], nn_adapter.run_adapters

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return full(*args, **kwargs)

    monkeypatch.setattr(nn_adapter, "run_adapters", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout,hh,ww,n", [("lnc", 16, 16, 1), ("nchw", 9, 8, 1), ("nhwc", 9, 30, 1),
                                            ("lnc", 17, 17, 2), ("nhwc", 12, 10, 3), ("nchw", 24, 20, 1)])
def test_direct_training_runs_alone(monkeypatch, layout, hh, ww, n, dtype):
    # a training call on a map beyond the dense tables' size runs straight from C++ (the full path
    # would fail), recorded as cpu, its output poisoned before the kernel writes it: output, running
    # statistics and every gradient equal the float64 reference's, three steps in a row (the running
    # statistics move each time; momentum None on the second adapter: the cumulative average)
    from moce_fast.ops import _backend

    for momentum in (0.1, None):
        fast, ref, x = adapter_case(layout, hh, ww, n, dtype)
        fast.BN.momentum = ref.BN.momentum = momentum
        fast.train(), ref.train()
        with monkeypatch.context() as m:
            _full_path_fails(m)
            for step in range(3):
                xs = x if step == 0 else torch.randn(x.shape, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(step))
                for p in (*fast.parameters(), *ref.parameters()):
                    p.grad = None
                _check_training_step(fast, ref, xs, layout, dtype, 20 + step)
                assert _backend.last_run()["adaptir_mix_tail"] == "cpu"
        assert fast.BN.num_batches_tracked.item() == 3


def test_direct_training_without_autograd_and_frozen_parameters(monkeypatch):
    # under no_grad, and with every parameter frozen and x not requiring grad, the call still runs
    # straight from C++ and updates the running statistics (BatchNorm's training mode, not
    # autograd, decides that); frozen parameters with x requiring grad give x's gradient alone
    fast, ref, x = adapter_case("lnc", 12, 12, 1, torch.float32)
    fast.train(), ref.train()
    xl = to_layout(x, "lnc").float()
    with monkeypatch.context() as m:
        _full_path_fails(m)
        with moce_fast.backend("cpu"), torch.no_grad():
            y = fast(xl.requires_grad_())
        assert y.grad_fn is None
        with torch.no_grad():
            expected = ref(x)
        assert rel_err(from_layout(y, "lnc", x.shape), expected) < 1e-5
        assert rel_err(fast.BN.running_var, ref.BN.running_var) < 1e-5 and fast.BN.num_batches_tracked.item() == 1
        fast.requires_grad_(False), ref.requires_grad_(False)
        with moce_fast.backend("cpu"):
            y = fast(xl)
        assert grad_node(y) == CPU_TRAIN_NODE
        xr = x.clone().requires_grad_()
        expected = ref(xr)
        dy = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        y.backward(to_layout(dy, "lnc").float()), expected.backward(dy)
        assert rel_err(from_layout(xl.grad, "lnc", x.shape), xr.grad) < 1e-4
        assert all(p.grad is None for p in fast.parameters())


def test_direct_training_declines_to_the_full_path(monkeypatch):
    # what the C++ checks decline takes the full path, which runs it as before (the kernel where it
    # takes the call, else the torch path) and gives the full path's errors for bad input; nothing
    # is changed by the declined call (the running statistics move once per call)
    from moce_fast.ops import _backend

    def run(adapter, x, backend="cpu"):
        before = adapter.BN.num_batches_tracked.item()
        with moce_fast.backend(backend):
            y = adapter(x)
        assert adapter.BN.num_batches_tracked.item() == before + 1
        return y

    fast, _, _ = adapter_case("lnc", 12, 12, 1, torch.float32)
    fast.train()
    calls = _full_path_spy(monkeypatch)
    run(fast, torch.randn(144, 1, 56))
    assert calls == []
    # a map of the dense tables (64 pixels or fewer): the full path makes them, and runs the kernel
    assert grad_node(run(fast, torch.randn(64, 1, 56, requires_grad=True))) == CPU_TRAIN_NODE
    assert len(calls) == 1 and _backend.last_run()["adaptir_mix_tail"] == "cpu"
    # the torch backend; L and N axes that do not merge; a dtype other than the parameters'
    assert grad_node(run(fast, torch.randn(144, 1, 56, requires_grad=True), "torch")) == "_FusedTrainBackward"
    assert _backend.last_run()["adaptir_mix_tail"] == "torch"
    run(fast, torch.randn(2, 144, 56).transpose(0, 1))
    run(fast, torch.randn(144, 1, 56, dtype=torch.float64))
    assert len(calls) == 4
    # more rows than the limit (lowered here): the torch paths
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING", 100)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING_NARROW", 100)
    run(fast, torch.randn(144, 1, 56))
    assert len(calls) == 5 and _backend.last_run()["adaptir_mix_tail"] == "torch"
    monkeypatch.undo()
    calls = _full_path_spy(monkeypatch)
    # no running statistics kept: the full path (BatchNorm on the batch alone)
    untracked = moce_fast.AdaptIRAdapter(56, "edt", "lnc")
    untracked.BN = torch.nn.BatchNorm2d(untracked.BN.num_features, track_running_stats=False)
    with moce_fast.backend("cpu"):
        untracked(torch.randn(144, 1, 56))
    assert len(calls) == 1
    # inference mode: the full path
    with torch.inference_mode():
        run(fast, torch.randn(144, 1, 56))
    assert len(calls) == 2
    # bad input: the full path's errors, the running statistics unchanged
    before = fast.BN.num_batches_tracked.item()
    for bad, match in ((torch.randn(143, 1, 56), "square token grid"), (torch.randn(144, 1, 55), "56 channels"),
                       (torch.randn(1, 1, 56), "more than one value per channel")):
        with moce_fast.backend("cpu"), pytest.raises(ValueError, match=match):
            fast(bad)
    assert fast.BN.num_batches_tracked.item() == before


def test_direct_training_autograd_semantics(monkeypatch):
    # the C++ node keeps autograd's contracts: an in-place change of x or of a parameter before the
    # backward is an error; retain_graph runs the backward twice (gradients accumulate); a backward
    # with create_graph gives the right first-order gradients, and differentiating them again
    # raises (once differentiable) instead of giving zeros
    fast, ref, x = adapter_case("nhwc", 9, 10, 2, torch.float64)
    fast.train(), ref.train()
    _full_path_fails(monkeypatch)

    def forward(xl):
        with moce_fast.backend("cpu"):
            return fast(xl)

    xl = to_layout(x, "nhwc").clone().requires_grad_()
    y = forward(xl)
    with torch.no_grad():
        fast.tail.weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = forward(xl)
    with torch.no_grad():
        xl.add_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    fast.zero_grad(set_to_none=True)
    xl = to_layout(x, "nhwc").clone().requires_grad_()
    y = forward(xl)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y.backward(dy, retain_graph=True)
    once = [p.grad.clone() for p in fast.parameters()] + [xl.grad.clone()]
    y.backward(dy)
    twice = [p.grad for p in fast.parameters()] + [xl.grad]
    assert all(torch.allclose(b, 2 * a, rtol=1e-12, atol=0) for a, b in zip(once, twice))
    xl = to_layout(x, "nhwc").clone().requires_grad_()
    y = forward(xl)
    (gx,) = torch.autograd.grad(y, xl, dy.clone().requires_grad_(), create_graph=True)
    assert rel_err(gx, once[-1]) < 1e-12
    with pytest.raises(RuntimeError, match="once differentiable"):
        gx.sum().backward()


def test_train_call_bad_arguments_are_clear_errors():
    from moce_fast.nn.adapter import _raw_tensors
    from moce_fast.ops import _cuda

    fast, _, x = adapter_case("nchw", 12, 12, 1, torch.float64)
    raw, nbt = _raw_tensors(fast), fast.BN.num_batches_tracked
    with pytest.raises(RuntimeError, match="raw: expected the adapter's 26 stored tensors, got 25"):
        _cuda.cpu_train_call(x, raw[:25], nbt, 0, 1e-5, 0.1, 100000, 100000, 64)
    with pytest.raises(RuntimeError, match=r"layout: expected 0 \(nchw\), 1 \(lnc\) or 2 \(nhwc\), got 3"):
        _cuda.cpu_train_call(x, raw, nbt, 3, 1e-5, 0.1, 100000, 100000, 64)
    with pytest.raises(RuntimeError, match="num_batches_tracked: expected a CPU int64 tensor of one value"):
        _cuda.cpu_train_call(x, raw, nbt.double(), 0, 1e-5, 0.1, 100000, 100000, 64)
    # (144 rows, more than 100; float64: the wide limit, not the narrow one)
    assert _cuda.cpu_train_call(x, raw, nbt, 0, 1e-5, 0.1, 100, 100000, 64) is None
    # one row (declined for itself, not as a map of the dense tables' size): BatchNorm needs two
    assert _cuda.cpu_train_call(x[:, :, :1, :1], raw, nbt, 0, 1e-5, 0.1, 100000, 100000, 0) is None
    assert nbt.item() == 0
    assert _cuda.cpu_train_call(x, raw, nbt, 0, 1e-5, 0.1, 100000, 100000, 64) is not None
    assert nbt.item() == 1


@pytest.mark.parametrize("layout", ["nchw", "lnc", "nhwc"])
def test_direct_training_takes_what_the_full_path_takes(monkeypatch, layout):
    # the training call's checks in C++ (input_reason, shared with the eval plan) and the full
    # path's (cpu_kernel_reason: the same C++ rule for x, then the row limit and the parameters'
    # rule through Python) agree: on each input the direct call runs exactly where the full path
    # would take the kernel on a map beyond the dense tables' size (dtype, empty, several images by
    # layout, L and N axes that do not merge, the row limit in force), and then equals the torch
    # backend's output
    from moce_fast.nn.adapter import _raw_tensors
    from moce_fast.ops import _cuda

    fast, _, _ = adapter_case(layout, 12, 12, 1, torch.float32)
    fast.train()
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING", 600)
    monkeypatch.setattr(ops, "CPU_KERNEL_MAX_ROWS_TRAINING_NARROW", 600)
    g = torch.Generator().manual_seed(6)

    def images(n, side=12, dtype=torch.float32):
        return to_layout(torch.randn(n, 56, side, side, generator=g, dtype=torch.float64), layout).to(dtype)

    inputs = [images(1), images(1, 10), images(1, 8), images(1, dtype=torch.float64), images(0), images(2),
              images(4), images(5), images(1).requires_grad_()]
    if layout == "lnc":
        inputs.append(torch.randn(3, 144, 56, generator=g).transpose(0, 1))  # (L and N axes that do not merge)
    code, taken = ops._LAYOUT_CODE[layout], 0
    for t in inputs:
        twin = copy.deepcopy(fast)
        raw = _raw_tensors(twin)
        why = ops.cpu_kernel_reason(t, layout, [raw[i] for i in range(26) if i not in (4, 5)], True)
        _, hh, ww = ops.as_npc(t, layout)
        pixels = hh * ww
        out = _cuda.cpu_train_call(t, raw, twin.BN.num_batches_tracked, code, twin.BN.eps, twin.BN.momentum,
                                   ops.CPU_KERNEL_MAX_ROWS_TRAINING, ops.CPU_KERNEL_MAX_ROWS_TRAINING_NARROW,
                                   ops.CPU_KERNEL_DENSE_DFT_MAX_PIXELS)
        direct = why is None and pixels > ops.CPU_KERNEL_DENSE_DFT_MAX_PIXELS
        assert (out is not None) == direct, (tuple(t.shape), t.dtype, why)
        assert twin.BN.num_batches_tracked.item() == int(direct)
        if out is not None:
            taken += 1
            with moce_fast.backend("torch"):
                assert rel_err(out, copy.deepcopy(fast)(t)) < 1e-5, tuple(t.shape)
            assert rel_err(twin.BN.running_var, fast.BN.running_var) > 0  # (moved by the batch)
    # (12 and 10 side maps, x requiring grad, and in "lnc" and "nhwc" 2 and 4 images: 5 are over the limit)
    assert taken == (3 if layout == "nchw" else 5)


def test_several_tasks_node_autograd_semantics():
    # several tasks' adapters on one batch go through the same C++ node (its task form): an in-place
    # change of a task's parameter before the backward is an error; retain_graph runs the backward
    # twice (gradients accumulate, a task with no image gets zeros twice); a create_graph backward's
    # first-order gradient is the plain one, and differentiating it again raises
    from moce_fast import adapters

    host, _ = _task_site("nhwc", torch.float64)
    host.train()
    names = ["b", "a", "b"]
    x = torch.randn(3, 9, 10, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(40))
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(41))

    def forward(xl):
        with moce_fast.backend("cpu"), adapters.tasks(names):
            y = host(xl)  # (the site's output: module(x) + adapter(x))
        assert CPU_TRAIN_NODE in graph_nodes(y)
        return y

    y = forward(x.clone().requires_grad_())
    with torch.no_grad():
        host[0].adapters["a"].tail.weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    host.zero_grad(set_to_none=True)
    xl = x.clone().requires_grad_()
    y = forward(xl)
    y.backward(dy, retain_graph=True)
    once = [p.grad.clone() for p in host.parameters()] + [xl.grad.clone()]
    assert not host[0].adapters["c"].tail.weight.grad.any()
    y.backward(dy)
    twice = [p.grad for p in host.parameters()] + [xl.grad]
    assert all(torch.allclose(b, 2 * a, rtol=1e-12, atol=0) for a, b in zip(once, twice))
    xl = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(forward(xl), xl, dy.clone().requires_grad_(), create_graph=True)
    assert rel_err(gx, once[-1]) < 1e-12
    with pytest.raises(RuntimeError, match="once differentiable"):
        gx.sum().backward()
