"""AdaptIR: the reference (equal to the public adapter: checked locally against csguoh/AdaptIR to
6e-16 in float64, train and eval) and the layout-aware module."""

from __future__ import annotations

import pytest
import torch

import moce_fast
from moce_fast.reference import AdaptIR
from conftest import randomize_, rel_err

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
        return x, x
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
    with pytest.raises(ValueError, match="too small"):
        moce_fast.AdaptIRAdapter(96, "ipt")
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


@pytest.mark.parametrize("layout", ["nchw", "lnc", "nhwc"])
@pytest.mark.parametrize("n", [1, 3])
def test_inference_without_autograd_equals_reference(layout, n):
    # no grad mode takes its own paths: the head's product without its autograd Function, and
    # parameter views kept on the adapter between calls
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", layout)).double().eval()
    ref = AdaptIR(56, "edt").double().eval()
    ref.load_state_dict(adapter.state_dict())
    for _ in range(2):  # the second call runs on the kept views
        x, xl = _inputs(layout, 56, n=n)
        with torch.no_grad():
            y, expected = adapter(xl), ref(x)
        if layout == "nhwc":
            expected = expected.permute(0, 2, 3, 1)
        elif layout == "lnc":
            expected = expected.flatten(2).permute(2, 0, 1)
        assert rel_err(y, expected) < 1e-12


def test_kept_parameter_views_follow_every_change():
    """The views kept for calls outside autograd see in-place updates, and are rebuilt when a
    tensor is moved, converted or replaced (a stale view would silently compute with old weights)."""
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).double().eval()
    ref = AdaptIR(56, "edt").double().eval()
    x = torch.randn(2, 5, 5, 56, dtype=torch.float64)

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
    adapter.float()  # converted: every storage new
    check(torch.float32, 1e-5)
    adapter.double()
    # autograd after no-grad calls: gradients reach the parameters (no kept views in the graph)
    adapter(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.named_parameters()
               if n != "compress.bias")


def test_no_grad_inference_traces_without_graph_breaks_under_torch_compile():
    # the kept parameter views are plain Python state: skipped while dynamo traces (a graph break
    # at every adapter would split a host model's graph)
    adapter = randomize_(moce_fast.AdaptIRAdapter(56, "edt", "nhwc")).eval()
    x = torch.randn(2, 5, 5, 56)
    compiled = torch.compile(adapter, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), adapter(x), rtol=1e-6, atol=1e-6)
