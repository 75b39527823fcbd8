"""Shared helpers for the correctness tests."""

from __future__ import annotations

import os
import shutil

# Without a GPU, Triton kernels run through the interpreter on CPU tensors. The variable must be
# set before triton is first imported (tests/test_triton_compile.py compiles for GPU targets in a
# subprocess without it).
if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import moce_fast

# A MoCE-IR small enough for float64 gradcheck on a CPU: two levels, one block per group.
TINY = dict(dim=8, levels=2, heads=[1, 2], num_blocks=[1, 1], num_dec_blocks=[1], num_refinement_blocks=1,
            ffn_expansion_factor=2, rank=2, num_experts=2, topk=1, rank_type="spread", depth_type="constant",
            stage_depth=[1], with_complexity=True, complexity_scale="max")

# Three levels, two decoder blocks per level, four experts: routing has room to differ per image.
SMALL = dict(dim=16, levels=3, heads=[1, 2, 4], num_blocks=[1, 1, 1], num_dec_blocks=[2, 2],
             num_refinement_blocks=1, ffn_expansion_factor=2, rank=2, num_experts=4, topk=1, rank_type="spread",
             depth_type="constant", stage_depth=[1, 1], with_complexity=True, complexity_scale="max")


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with fresh random values: the zero/one inits hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            if name.endswith(("norm.body.weight", "temperature")) or ".norms." in name and name.endswith("weight"):
                r = r + 1.0  # keep norms and temperatures positive-ish, like trained ones
            p.copy_(r.to(p.dtype))
    return module


def make_pair(config: dict, seed: int = 0, dtype=torch.float64, **overrides):
    """(fast moce_fast.MoCEIR, reference MoCEIR) with the same random weights, in eval mode."""
    cfg = dict(config, **overrides)
    fast = randomize_(moce_fast.MoCEIR(**cfg), seed).to(dtype).eval()
    ref = moce_fast.reference.MoCEIR(**cfg).to(dtype).eval()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, computed in float64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CPU_TRAIN_NODE = "AdapterCpuTrain"  # the CPU adapter kernel's training node (C++, csrc/adapter_cpu.cpp)


def skip_unless_backend_runs(backend: str) -> None:
    """Skip, saying why, where ``backend`` cannot run in these tests: "cpu" needs moce_fast._C."""
    import importlib.util

    if backend == "cpu" and importlib.util.find_spec("moce_fast._C") is None:
        pytest.skip("moce_fast._C was not built (needs a CUDA build of torch and nvcc)")


def node_name(node) -> str:
    """An autograd node's name: its Python type's, or for the C++ node of the CPU adapter kernel's
    training call (whose Python type is a generic one) ``CPU_TRAIN_NODE``."""
    return CPU_TRAIN_NODE if CPU_TRAIN_NODE in node.name() else type(node).__name__


def grad_node(t: torch.Tensor) -> str:
    """The name of the autograd node that made ``t`` (:func:`node_name`)."""
    return node_name(t.grad_fn)


def graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes below ``t`` (:func:`node_name`), every node visited once (by
    identity: two nodes of one name, e.g. two views, each lead on to their own inputs)."""
    visited, names, todo = set(), set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in visited:
            visited.add(node)
            names.add(node_name(node))
            todo.extend(n for n, _ in node.next_functions)
    return names


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, C, H, W) -> the adapter layout's tensor, a contiguous copy ("lnc": (H W, N, C), H == W)."""
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1).contiguous()
    if layout == "lnc":
        return x.flatten(2).permute(2, 0, 1).contiguous()
    return x.contiguous()


def from_layout(t: torch.Tensor, layout: str, shape) -> torch.Tensor:
    """The adapter layout's tensor ``t`` as an (N, C, H, W) view of the given ``shape``."""
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout == "lnc":
        return t.permute(1, 2, 0).reshape(shape)
    return t


def adapter_case(layout, hh, ww, n=1, dtype=torch.float64, zero=False, seed=0, variant="edt", dim=56):
    """A random moce_fast.AdaptIRAdapter (random running statistics too) in ``dtype``, the float64
    reference with the same state (exact phase at the self-conjugate bins, as moce_fast's paths),
    and N random images (N, C, H, W) in float64. ``zero``: the images, the head bias and the
    BatchNorm shift are 0, so the normalised map and every spectrum bin are exactly 0 (a map constant
    but not 0 has rounding noise for spectrum bins, whose phases, and so the reference's output, are
    noise too)."""
    from moce_fast.reference import AdaptIR

    fast = randomize_(moce_fast.AdaptIRAdapter(dim, variant, layout), seed).double()
    with torch.no_grad():
        fast.BN.running_mean.normal_()
        fast.BN.running_var.uniform_(0.5, 1.5)
        if zero:
            fast.head.bias.zero_()
            fast.BN.bias.zero_()
    ref = AdaptIR(dim, variant).double()
    ref.load_state_dict(fast.state_dict())
    ref.exact_phase = True
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, dim, hh, ww, generator=g, dtype=torch.float64) * (0 if zero else 1)
    return fast.to(dtype), ref, x


# Bias gradients that are sums over all pixels of terms of both signs: zero in exact arithmetic
# (softmax is shift-invariant; BatchNorm in training removes the head's bias) or much smaller than
# their terms (the spatial gate's bias: float32 torch itself is 1e-4 off there). Their round-off is
# that of a sum of terms the size of the sibling weight's gradient, so that is their scale.
SIBLING = {"compress.bias": "compress.weight", "head.bias": "head.weight",
           "spatial_interaction.bias": "spatial_interaction.weight"}


def assert_grads_close(fast_mod, ref_mod, fast_x, ref_x, tol):
    """Every gradient within tol of the reference, relative to its own size (or its sibling's)."""
    assert rel_err(fast_x.grad, ref_x.grad) < tol, "input gradient"
    assert_param_grads_close(fast_mod, ref_mod, tol)


def assert_param_grads_close(fast_mod, ref_mod, tol):
    """Every parameter gradient within tol of the reference, relative to its own size (or its
    sibling's: a gradient that is zero in exact arithmetic, as a bias before BatchNorm's). A
    gradient that is None (a module that saw no input, as a task without images) counts as zeros."""
    ref_params = dict(ref_mod.named_parameters())

    def grad(p):
        return torch.zeros_like(p) if p.grad is None else p.grad

    for name, p in fast_mod.named_parameters():
        expected = grad(ref_params[name])
        size = expected.abs().max().item()
        if name in SIBLING:
            size = max(size, grad(ref_params[SIBLING[name]]).abs().max().item())
        err = (grad(p).double().cpu() - expected).abs().max().item()
        assert err <= tol * size or err == 0.0, (name, err, size)


@pytest.fixture(autouse=True)
def _torch_backend_default():
    """Each test starts from the default backend and restores it."""
    before = moce_fast.current_backend()
    yield
    moce_fast.backend(before)


def pytest_collection_modifyitems(config, items):
    """Mark with ``gpu`` every test that skips without a CUDA device (its skip reason names one), so
    that a session with a lent GPU can run those first: ``pytest -m gpu`` (scripts/gpu_check.sh)."""
    for item in items:
        if any("CUDA device" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


def pytest_runtest_logreport(report):
    """With MOCE_FAST_FAILURE_LOG=FILE, append each failure to FILE as it happens (its node id and the
    end of its report): a run cut off by a time limit (a lent GPU's lease) prints no summary."""
    path = os.environ.get("MOCE_FAST_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # once, from the controller
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n")
