"""The backend switch: global setting, context manager, environment variable, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moce_fast
from moce_fast.ops import _backend


def test_context_manager_restores_and_global_setting_sticks():
    assert moce_fast.current_backend() == os.environ.get("MOCE_FAST_BACKEND", "auto")
    with moce_fast.backend("torch"):
        assert moce_fast.current_backend() == "torch"
        moce_fast.ops.layer_norm(torch.rand(1, 4, 2, 2), torch.ones(4), torch.zeros(4))
        assert moce_fast.ops.last_run()["layer_norm"] == "torch"
    assert moce_fast.current_backend() == os.environ.get("MOCE_FAST_BACKEND", "auto")
    moce_fast.backend("torch")
    assert moce_fast.current_backend() == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend: expected one of"):
        moce_fast.backend("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_cuda_backend_without_gpu_is_a_clear_error():
    with pytest.raises(moce_fast.BackendUnavailableError, match="'cuda' cannot run here: no CUDA device"):
        moce_fast.backend("cuda")


def test_op_without_a_kernel_for_the_backend_runs_torch_and_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_current", "triton")
    moce_fast.ops.pointwise(torch.rand(1, 4, 2, 2), torch.rand(3, 4, 1, 1))
    assert moce_fast.ops.last_run()["pointwise"] == "torch"


def test_backend_on_a_device_it_does_not_serve_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_backend, "_current", "triton")
    with pytest.raises(moce_fast.BackendUnavailableError, match="'triton' runs CUDA tensors"):
        moce_fast.ops.layer_norm(torch.rand(1, 4, 2, 2), torch.ones(4), torch.zeros(4))
    monkeypatch.setattr(_backend, "_current", "cuda")
    with pytest.raises(moce_fast.BackendUnavailableError, match="'cuda' runs CUDA tensors only"):
        moce_fast.ops.layer_norm(torch.rand(1, 4, 2, 2), torch.ones(4), torch.zeros(4))


@pytest.mark.parametrize("current,interpret,device,expected", [
    ("triton", "1", "cpu", True),    # the interpreter on CPU tensors
    ("triton", "0", "cpu", False),   # (resolve raises there: the staged path gives the error)
    ("triton", "0", "cuda", True),
    ("auto", "1", "cpu", False),     # auto never picks triton for CPU tensors
    ("torch", "1", "cpu", False),
    ("cpu", "1", "cpu", False),
])
def test_triton_chosen_follows_resolve(monkeypatch, current, interpret, device, expected):
    """triton_chosen (a fused path's check that both of its ops would run their triton kernels)
    agrees with resolve's choice for an op that has a triton kernel, and records nothing."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(_backend, "_current", current)
    before = _backend.last_run()
    assert _backend.triton_chosen(torch.device(device)) is expected
    assert _backend.last_run() == before
    if device == "cpu":
        args = (torch.rand(1, 4, 3), torch.rand(1, 2, 3), None, torch.zeros(1, dtype=torch.long), "npm",
                torch.float32)
        try:
            name = _backend.resolve("adaptir_linear", torch.device(device), args)[0]
        except moce_fast.BackendUnavailableError:
            name = None
        assert (name == "triton") is expected


def test_environment_variable_sets_the_default():
    code = "import moce_fast; print(moce_fast.current_backend())"
    env = dict(os.environ, MOCE_FAST_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["MOCE_FAST_BACKEND"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOCE_FAST_BACKEND: expected one of" in bad.stderr


def test_debug_log_names_the_backend(caplog):
    with caplog.at_level("DEBUG", logger="moce_fast"), moce_fast.backend("torch"):
        moce_fast.ops.pointwise(torch.rand(1, 2, 3, 3), torch.rand(4, 2, 1, 1))
    assert "op pointwise: backend torch on cpu" in caplog.text


@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_large_nchw_map_runs_as_gemm_and_matches_conv(with_bias):
    # CPU maps of >= 128 x 128 pixels take the GEMM path of the torch backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 128, 130, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    with moce_fast.backend("torch"):
        out = moce_fast.ops.pointwise(x, w, b)
    expect = torch.nn.functional.conv2d(x, w, b)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    params = [x, w] + ([b] if with_bias else [])
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(expect, params, up)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad(), moce_fast.backend("torch"):  # the in-place bias add of the no-grad path
        torch.testing.assert_close(moce_fast.ops.pointwise(x, w, b), expect, rtol=1e-12, atol=1e-12)


def test_dispatch_traces_without_graph_breaks_under_torch_compile():
    # the backend switch (and its debug logging) must not break a torch.compile graph at every op
    from moce_fast.nn import EncoderBlock

    torch.manual_seed(0)
    block = EncoderBlock(16, 2, 2.0, False, "WithBias").eval()
    x = torch.randn(2, 16, 8, 8)
    compiled = torch.compile(block, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad(), moce_fast.backend("torch"):
        torch.testing.assert_close(compiled(x), block(x))


def test_training_traces_without_graph_breaks_under_torch_compile():
    # with gradients the torch backend runs its own autograd Functions (the attention's Gram matrices
    # and norms) in eager mode; compiled, the attention runs the plain ops (torch 2.11's dynamo traced
    # that Function to wrong input gradients): the compiled step must have no graph break and match
    # eager, forward and backward
    from moce_fast.nn import EncoderBlock

    torch.manual_seed(0)
    block = EncoderBlock(16, 2, 2.0, False, "WithBias").train()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    leaves = [x, *block.parameters()]
    with moce_fast.backend("torch"):
        want = block(x)
        want_grads = torch.autograd.grad(want.square().sum(), leaves)
        compiled = torch.compile(block, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
        got = compiled(x)
        got_grads = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_cli_offers_every_backend():
    # the CLI lists the names without importing torch at start-up; they must be the ops' names
    from moce_fast import cli

    assert cli.BACKEND_CHOICES == list(moce_fast.ops.BACKENDS)
