"""Injecting AdaptIR adapters into a host model: freeze, save/load, remove, many tasks in one batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moce_fast import adapters as A
from moce_fast.models import CheckpointError
from conftest import randomize_, skip_unless_backend_runs

DIM = 192  # IPT's adapter width rule: hidden = 192 // 24 = 8


class Layer(nn.Module):
    """An IPT-style transformer layer on (L, N, C) tokens: x + mlp(norm(x))."""

    def __init__(self):
        super().__init__()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        y = self.norm2(x)
        return x + self.mlp(y)


class Host(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def tokens(n=3, side=4, seed=0):
    return torch.randn(side * side, n, DIM, generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model, seed=1):
    for _, m in model.named_modules():
        if isinstance(m, A.AdaptedModule):
            for i, ad in enumerate(m.adapters.values()):
                randomize_(ad, seed=seed + i, scale=0.2)


def test_inject_freeze_remove_bitwise():
    torch.manual_seed(0)
    host = Host().eval()
    x = tokens()
    with torch.no_grad():
        original = host(x)
    A.add_adapters(host, r"layers\.\d+\.mlp$", DIM, variant="ipt", layout="lnc")
    info = A.summary(host)
    assert info["adapted"] == ["layers.0.mlp", "layers.1.mlp"]
    assert 0 < info["trainable"] < 0.2 * info["total"]
    assert all(p.requires_grad == (".adapters." in n) for n, p in host.named_parameters())
    with torch.no_grad():
        assert torch.equal(host(x), original)  # new adapters are exact no-ops
    _randomize_adapters(host)
    with torch.no_grad():
        assert not torch.allclose(host(x), original)
    A.remove_adapters(host)
    with torch.no_grad():
        assert torch.equal(host(x), original)
    assert all(p.requires_grad for p in host.parameters())
    assert not any(isinstance(m, A.AdaptedModule) for m in host.modules())


def test_save_and_load_adapters(tmp_path):
    torch.manual_seed(0)
    host = A.add_adapters(Host().eval(), lambda name: name.endswith("mlp"), DIM, layout="lnc")
    _randomize_adapters(host)
    x = tokens()
    with torch.no_grad():
        expected = host(x)
    A.save_adapters(host, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    other = A.add_adapters(Host().eval(), lambda name: name.endswith("mlp"), DIM, layout="lnc")
    A.load_adapters(other, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    wrong = A.add_adapters(Host().eval(), r"layers\.0\.mlp$", DIM, layout="lnc")
    with pytest.raises(CheckpointError, match="unexpected"):
        A.load_adapters(wrong, tmp_path / "a.safetensors")


def test_mixed_task_batch_equals_each_image_alone():
    torch.manual_seed(0)
    host = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc", tasks=("denoise", "derain", "dehaze"))
    _randomize_adapters(host)
    x = tokens(n=4)
    names = ["derain", "denoise", "derain", "dehaze"]
    with torch.no_grad(), A.tasks(names):
        mixed = host(x)
    for i, name in enumerate(names):
        with torch.no_grad(), A.tasks([name]):
            alone = host(x[:, i:i + 1])
        torch.testing.assert_close(mixed[:, i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_task_indices_made_once_per_block(monkeypatch):
    # every adapted site of one `tasks` block reads one index tensor, made at the first site (on a
    # GPU, one pinned non-blocking copy instead of a synchronising copy per site); a new block makes
    # its own, and a site whose adapters are in another order gets indices into that order
    import moce_fast.adapters as adapters_module

    host = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc", tasks=("denoise", "derain", "dehaze"))
    seen = []
    real = adapters_module.run_adapters

    def spy(adapters, x, task):
        seen.append(task)
        return real(adapters, x, task)

    monkeypatch.setattr(adapters_module, "run_adapters", spy)
    x = tokens(n=3)
    names = ["dehaze", "denoise", "dehaze"]
    with torch.no_grad(), A.tasks(names):
        host(x)
    assert len(seen) == 2 and seen[0] is seen[1]
    assert seen[0].tolist() == [2, 0, 2] and seen[0].dtype == torch.int64
    with torch.no_grad(), A.tasks(names):
        host(x)
    assert seen[2] is not seen[0] and torch.equal(seen[2], seen[0])
    mlp = host.layers[1].mlp
    mlp.adapters = nn.ModuleDict({k: mlp.adapters[k] for k in ("dehaze", "derain", "denoise")})
    with torch.no_grad(), A.tasks(names):
        host(x)
    assert seen[4].tolist() == [2, 0, 2] and seen[5].tolist() == [0, 2, 0]
    # first needed while a CUDA graph is captured: a clear error, not a captured host copy
    monkeypatch.setattr(adapters_module, "capturing", lambda device: True)
    with A.tasks(names), pytest.raises(RuntimeError, match="during CUDA-graph capture"):
        adapters_module._TASKS.get().indices(("denoise", "derain", "dehaze"), torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host/device synchronisation)")
def test_mixed_task_batch_does_not_synchronise_on_gpu():
    # a mixed-task step through two adapted sites queues its work without waiting for the device:
    # under sync debug mode "error" any synchronising call (a pageable copy, .item(), nonzero...) raises
    torch.manual_seed(0)
    host = A.add_adapters(Host(), r"mlp$", DIM, layout="lnc", tasks=("denoise", "derain")).cuda()
    _randomize_adapters(host)
    x = tokens(n=4).cuda()
    names = ["derain", "denoise", "derain", "derain"]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with A.tasks(names):
            host.train()
            host(x).sum().backward()
            host.eval()
            with torch.no_grad():
                host(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bad_uses():
    host = Host()
    with pytest.raises(ValueError, match="matches no module"):
        A.add_adapters(host, r"attention", DIM)
    with pytest.raises(TypeError, match="regex string or a predicate"):
        A.add_adapters(host, 3, DIM)
    with pytest.raises(ValueError, match=r"targets: 'mlp\(' is not a valid regular expression \(missing \)"):
        A.add_adapters(host, r"mlp(", DIM)
    A.add_adapters(host, r"mlp$", DIM, layout="lnc", tasks=("a", "b"))
    x = tokens(n=2)
    with pytest.raises(ValueError, match="choose one per image"):
        host(x)
    with pytest.raises(ValueError, match="unknown task names"), A.tasks(["a", "c"]):
        host(x)
    with pytest.raises(ValueError, match="one task name per image"), A.tasks(["a"]):
        host(x)
    # the tasks' grouped path checks x's device against the adapters' (an Identity site: nothing of
    # the host's own runs on x first)
    ident = A.add_adapters(nn.Sequential(nn.Identity()), r"^0$", DIM, layout="lnc", tasks=("a", "b"))
    with pytest.raises(ValueError, match=r"x: on meta, the module's parameters on cpu"), A.tasks(["a", "b"]):
        ident(x.to("meta"))
    with pytest.raises(ValueError, match="distinct non-empty task names"):
        A.add_adapters(Host(), r"mlp$", DIM, tasks=("a", "a"))
    # a target whose output is not its input's shape (the MLP's first Linear widens to 2 * DIM)
    wide = A.add_adapters(Host(), r"layers\.0\.mlp\.0$", DIM, layout="lnc")
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.0' returned \(16, 2, 384\) for an input of shape "
                                         r"\(16, 2, 192\)"):
        wide(x)
    # a string is one name, not its letters: one task for add_adapters, refused as a batch's names
    one = A.add_adapters(Host(), r"mlp$", DIM, layout="lnc", tasks="derain")
    assert [sorted(m.adapters) for _, m in A._adapted(one)] == [["derain"]] * 2
    with pytest.raises(TypeError, match=r"one task name per image \(a list\), got the string 'a'"):
        with A.tasks("a"):
            pass
    with pytest.raises(TypeError, match=r"expected task names \(strings\), got \[0\]"):
        with A.tasks(["a", 0]):
            pass


def test_adding_tasks_to_adapted_sites_later():
    # a second add_adapters call puts new tasks' adapters beside the ones a site has (the targets see
    # the names without adapters), the first task's outputs do not change, and removal gives back
    # the original model bitwise
    torch.manual_seed(0)
    host = Host().eval()
    x = tokens(n=2)
    with torch.no_grad():
        original = host(x)
    A.add_adapters(host, r"layers\.\d+\.mlp$", DIM, layout="lnc", tasks=("denoise",))
    _randomize_adapters(host)
    with torch.no_grad():
        denoise = host(x)
    for p in A.task_parameters(host, "denoise"):  # the trained task stays fixed from here on
        p.requires_grad_(False)
    A.add_adapters(host, lambda name: name.endswith("mlp"), DIM, layout="lnc", tasks=("derain",))
    assert A.summary(host)["adapted"] == ["layers.0.mlp", "layers.1.mlp"]
    assert [sorted(m.adapters) for _, m in A._adapted(host)] == [["denoise", "derain"]] * 2
    assert A.summary(host)["tasks"] == {"layers.0.mlp": ["denoise", "derain"], "layers.1.mlp": ["denoise", "derain"]}
    assert [m.site for _, m in A._adapted(host)] == ["layers.0.mlp", "layers.1.mlp"]
    assert all(p.requires_grad == (".adapters.derain." in n) for n, p in host.named_parameters())
    with torch.no_grad(), A.tasks(["denoise", "denoise"]):
        torch.testing.assert_close(host(x), denoise, rtol=0, atol=0)
    with torch.no_grad(), A.tasks(["derain", "derain"]):
        assert torch.equal(host(x), original)  # the new task's adapters are no-ops
    # a module inside an adapted site's base is found by its name without adapters: the inner
    # Linear "layers.0.mlp.0" (in the model "layers.0.mlp.base.0") is inside a site, refused
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.0', inside 'layers\.0\.mlp'.*do not nest"):
        A.add_adapters(host, r"layers\.0\.mlp\.0$", 2 * DIM, layout="lnc", tasks=("x",))
    with pytest.raises(ValueError, match=r"'layers\.0', around 'layers\.0\.mlp'.*do not nest"):
        A.add_adapters(host, r"layers\.0$", DIM, layout="lnc", tasks=("x",))
    # the adapters' own modules are not targets ("head" is a Conv2d of every adapter)
    with pytest.raises(ValueError, match="'head' matches no module"):
        A.add_adapters(host, r"head", DIM, layout="lnc", tasks=("x",))
    # a task a site has, or other adapter settings at a site: refused, and nothing changed
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.raises(ValueError, match=r"has adapters for \['derain'\] already"):
        A.add_adapters(host, r"mlp$", DIM, layout="lnc", tasks=("dehaze", "derain"))
    with pytest.raises(ValueError, match=r"\(dim, variant, layout\) = \(192, 'ipt', 'lnc'\).*\(192, 'edt', 'lnc'\)"):
        A.add_adapters(host, r"mlp$", DIM, variant="edt", layout="lnc", tasks=("dehaze",))
    assert list(host.state_dict()) == list(before)
    assert [sorted(m.adapters) for _, m in A._adapted(host)] == [["denoise", "derain"]] * 2
    A.remove_adapters(host)
    with torch.no_grad():
        assert torch.equal(host(x), original)
    assert all(p.requires_grad for p in host.parameters())
    # the second site refuses: the first, which could take its adapter, is left as it was too
    A.add_adapters(host, r"layers\.1\.mlp$", DIM, layout="lnc", tasks=("a",))
    with pytest.raises(ValueError, match=r"'layers\.1\.mlp' has adapters for \['a'\] already"):
        A.add_adapters(host, r"mlp$", DIM, layout="lnc", tasks=("a",))
    assert A.summary(host)["adapted"] == ["layers.1.mlp"]
    A.add_adapters(host, r"layers\.0\.mlp$", DIM, layout="lnc", tasks=("b",))  # sites of different tasks
    assert A.summary(host)["tasks"] == {"layers.0.mlp": ["b"], "layers.1.mlp": ["a"]}


def test_host_modules_named_adapters_are_not_adapters(tmp_path):
    # the freeze and the saved state pick the adapters by where they sit, not by a name that a host
    # module may share
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapters = nn.ModuleList([Layer()])  # the host's own module called "adapters"
            self.layers = nn.ModuleList([Layer()])

        def forward(self, x):
            return self.layers[0](self.adapters[0](x))

    host = A.add_adapters(Named(), r"layers\.0\.mlp$", DIM, layout="lnc")
    frozen = [n for n, p in host.named_parameters() if not p.requires_grad]
    assert "adapters.0.mlp.0.weight" in frozen
    assert all(n.startswith("layers.0.mlp.adapters.default.") for n, p in host.named_parameters() if p.requires_grad)
    assert all(k.startswith("layers.0.mlp.adapters.default.") for k in A.adapter_state_dict(host))
    A.save_adapters(host, tmp_path / "a.safetensors")
    A.load_adapters(host, tmp_path / "a.safetensors")


def test_load_adapters_refuses_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file

    host = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc")
    _randomize_adapters(host)
    A.save_adapters(host, tmp_path / "a.safetensors")
    good = load_file(tmp_path / "a.safetensors")
    target = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    (tmp_path / "garbage").write_bytes(b"not a safetensors file")
    (tmp_path / "half").write_bytes((tmp_path / "a.safetensors").read_bytes()[:3000])
    bias = "layers.1.mlp.adapters.default.conv_bias"
    save_file({**good, bias: good[bias].to(torch.int32)}, tmp_path / "int")
    nan = dict(good)
    nan[bias] = good[bias].clone()
    nan[bias][3] = float("nan")
    save_file(nan, tmp_path / "nan")
    cases = {"garbage": "not a readable safetensors file", "half": "not a readable safetensors file",
             "int": rf"another kind.*{bias}: model torch.float32, checkpoint torch.int32",
             "nan": rf"NaN or infinite values: 1 \['{bias}'\]"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            A.load_adapters(target, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no file at"):
        A.load_adapters(target, tmp_path / "missing")
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="has no adapters to load into"):
        A.load_adapters(Host(), tmp_path / "a.safetensors")
    A.load_adapters(target, tmp_path / "a.safetensors")  # the good file, any suffix
    assert all(torch.equal(v, good[k]) for k, v in A.adapter_state_dict(target).items())


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_freezing_one_task_while_another_trains(backend):
    # a mixed batch trains task a with task b's adapters frozen: b gets no gradients, a the same ones
    # as with b trainable; a task left out of the batch but trainable gets zero gradients (triton:
    # on a GPU where there is one, else through the interpreter on CPU tensors)
    import moce_fast

    skip_unless_backend_runs(backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = tokens(n=3).to(device)
    grads = []
    for freeze in (False, True):
        torch.manual_seed(0)
        host = Host().to(device).train()
        A.add_adapters(host, r"mlp$", DIM, layout="lnc", tasks=("a", "b", "c"))
        _randomize_adapters(host)
        if freeze:
            frozen = A.task_parameters(host, "b")
            assert len(frozen) == 2 * len(list(host.layers[0].mlp.adapters["b"].parameters()))
            for p in frozen:
                p.requires_grad_(False)
        with moce_fast.backend(backend), A.tasks(["a", "b", "a"]):
            host(x).square().sum().backward()
        grads.append({n: p.grad for n, p in host.named_parameters() if p.requires_grad})
        if freeze:
            assert all(p.grad is None for p in A.task_parameters(host, "b"))
        assert all(p.grad is not None and not p.grad.any() for p in A.task_parameters(host, "c"))
        assert any(p.grad.abs().sum() > 0 for p in A.task_parameters(host, "a"))
    for n, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'d' has no adapters in this model \(it has \['a', 'b', 'c'\]\)"):
        A.task_parameters(host, "d")


def test_load_some_tasks_of_a_file(tmp_path):
    from safetensors.torch import load_file

    # a file of two tasks into a model serving one, and into a model with a task more than the file
    torch.manual_seed(0)
    host = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc", tasks=("a", "b"))
    _randomize_adapters(host)
    A.save_adapters(host, tmp_path / "ab.safetensors")
    x = tokens(n=2)
    with torch.no_grad(), A.tasks(["b", "b"]):
        expected_b = host(x)
    torch.manual_seed(0)  # the same host weights
    one = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc", tasks=("b",))
    with pytest.raises(CheckpointError, match=r"unexpected keys: 54 \['layers\.0\.mlp\.adapters\.a\."):
        A.load_adapters(one, tmp_path / "ab.safetensors")  # the whole file: task a has no place here
    A.load_adapters(one, tmp_path / "ab.safetensors", tasks="b")
    with torch.no_grad():
        torch.testing.assert_close(one(x), expected_b, rtol=0, atol=0)
    torch.manual_seed(0)
    more = A.add_adapters(Host().eval(), r"mlp$", DIM, layout="lnc", tasks=("b", "c"))
    c_before = {k: v.clone() for k, v in A.adapter_state_dict(more, ["c"]).items()}
    assert c_before and all(".adapters.c." in k for k in c_before)
    A.load_adapters(more, tmp_path / "ab.safetensors", tasks=["b"])
    with torch.no_grad(), A.tasks(["b", "b"]):
        torch.testing.assert_close(more(x), expected_b, rtol=0, atol=0)
    assert all(torch.equal(v, c_before[k]) for k, v in A.adapter_state_dict(more, ["c"]).items())
    with pytest.raises(CheckpointError, match=r"has no adapters for tasks \['c'\] \(it has \['a', 'b'\]\)"):
        A.load_adapters(more, tmp_path / "ab.safetensors", tasks=["b", "c"])
    with pytest.raises(ValueError, match=r"tasks: \['z'\] have no adapters in this model"):
        A.load_adapters(more, tmp_path / "ab.safetensors", tasks=["z"])
    # saving one task's adapters: that file loads whole into the one-task model
    A.save_adapters(host, tmp_path / "a.safetensors", tasks=["a"])
    only_a = load_file(tmp_path / "a.safetensors")
    assert sorted(only_a) == sorted(A.adapter_state_dict(host, "a")) and all(".adapters.a." in k for k in only_a)
    with pytest.raises(ValueError, match="has no adapters to save"):
        A.save_adapters(Host(), tmp_path / "none.safetensors")


def test_new_adapters_take_the_hosts_precision():
    # float64 hosts get float64 adapters (they were float32: the CPU kernel then declined the mixed
    # call, and a float64 gradcheck ran float32 parameters); half-precision hosts float32 ones; a
    # later call at an adapted site its adapters' dtype (one site's adapters run as one computation)
    import importlib.util

    import moce_fast
    from moce_fast.ops import _backend

    for host_dtype, expected in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        model = A.add_adapters(Host().to(host_dtype), r"layers\.\d+\.mlp$", dim=DIM, variant="ipt", layout="lnc")
        assert {p.dtype for p in A.task_parameters(model, "default")} == {expected}, host_dtype
        assert {b.dtype for n, b in model.named_buffers() if "running" in n} == {expected}, host_dtype
    model = A.add_adapters(Host().double(), r"layers\.\d+\.mlp$", dim=DIM, variant="ipt", layout="lnc",
                           tasks=("a",))
    for _, m in model.named_modules():  # the adapters in float32 on the float64 host
        if isinstance(m, A.AdaptedModule):
            m.adapters.float()
    A.add_adapters(model, r"layers\.\d+\.mlp$", dim=DIM, variant="ipt", layout="lnc", tasks=("b",))
    assert {p.dtype for p in A.task_parameters(model, "b")} == {torch.float32}
    # a float64 host's adapters run on the CPU kernel where it is built
    model = A.add_adapters(Host().double(), r"layers\.\d+\.mlp$", dim=DIM, variant="ipt", layout="lnc")
    _randomize_adapters(model)
    x = tokens().double().requires_grad_()
    if importlib.util.find_spec("moce_fast._C") is not None:
        with moce_fast.backend("cpu"):
            model(x).sum().backward()
        assert _backend.last_run()["adaptir_linear"] == "cpu"
    assert torch.autograd.gradcheck(lambda t: model(t), (x[:, :1].detach().clone().requires_grad_(),), eps=1e-6,
                                    atol=1e-6, fast_mode=True)
