"""Where the time of the headline GPU cases goes: host overhead or GPU work.

For each case (the AdaptIR adapter at issue 5's shapes, the MoCE layer at issue 3's headline case)
and each implementation, four numbers per call, all from one process on one device:
- ``sync_ms``: host clock around one call plus torch.cuda.synchronize() (what the benchmarks time);
- ``queued_ms``: host clock over many calls issued back to back, one synchronize at the end: equal
  to ``sync_ms`` when the host cannot keep the GPU busy;
- ``graph_ms``: the same calls replayed from one CUDA graph (no Python, no launch overhead): the GPU's
  own time, or "n/a: <reason>" when the path cannot be captured;
- ``kernels_ms`` and ``launches``: device time of the kernels of one call, and how many (the torch
  profiler), with the three costliest kernels; ``host_ops``: the call's top-level host events in
  that profile (torch ops, autograd nodes and the like, each a dispatch the host pays for).
Prints a table and writes the records as JSON (--json FILE). Run on a CUDA device only:
    python scripts/gpu_profile.py [--cases adapter,train,moce_layer,launch] [--batch 8] [--dtype fp32 bf16]
                                  [--compile] [--json FILE]
(``train``: the adapter's training step, forward and backward; ``launch``: the host cost of a
Triton launch by argument count, and of the adapter's eval call without its kernels; see
launch_cases.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timed(fn, reps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def _sync_ms(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _graph_ms(fn, reps: int):
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
    except Exception as e:  # a path with a host sync or a CPU-side decision cannot be captured
        return f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = {}
    total, launches = 0.0, 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
            total += t
            launches += 1
            per[ev.name] = per.get(ev.name, 0.0) + t
    top = sorted(per.items(), key=lambda kv: -kv[1])[:3]
    # the host's ops: top-level CPU events (torch ops, autograd nodes, Triton launches are not ops)
    ops = sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CPU and ev.cpu_parent is None)
    return total / 1e3, launches, [(name[:60], round(t / 1e3, 4)) for name, t in top], ops


def profile_case(name: str, impls: dict, reps: int) -> list[dict]:
    rows = []
    for impl, fn in impls.items():
        rec = {"case": name, "impl": impl}
        try:
            fn()  # compiles / warms up
            fn()
            rec["sync_ms"] = round(_sync_ms(fn, reps), 4)
            rec["queued_ms"] = round(_timed(fn, reps), 4)
            g = _graph_ms(fn, reps)
            rec["graph_ms"] = round(g, 4) if isinstance(g, float) else g
            rec["kernels_ms"], rec["launches"], rec["top"], rec["host_ops"] = _kernels(fn)
            rec["kernels_ms"] = round(rec["kernels_ms"], 4)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    return rows


def _adapter_shapes(batch: int, dtype, train: bool):
    """(variant, dim, side, moce_fast adapter, public adapter, x) at each of bench_adapter.py's
    shapes: the same random weights in both, on the GPU in ``dtype``, in train or eval mode."""
    import moce_fast
    sys.path.insert(0, "bench")
    from bench_adapter import SHAPES, PublicAdapter, _randomize
    from moce_fast.reference import AdaptIR

    for variant, dim, layout, side in SHAPES:
        torch.manual_seed(0)
        fast = moce_fast.AdaptIRAdapter(dim, variant, layout)
        _randomize(fast)
        ref = AdaptIR(dim, variant)
        ref.load_state_dict(fast.state_dict())
        fast, ref = fast.cuda().to(dtype).train(train), ref.cuda().to(dtype).train(train)
        shape = (side * side, batch, dim) if layout == "lnc" else (batch, side, side, dim)
        yield variant, dim, side, fast, PublicAdapter(ref, layout), torch.randn(shape, device="cuda", dtype=dtype)


def adapter_cases(batch: int, dtype, compile_too: bool):
    import moce_fast

    for variant, dim, side, fast, pub, x in _adapter_shapes(batch, dtype, False):
        def run(module, backend=None):
            def call():
                with torch.no_grad():
                    if backend is None:
                        return module(x)
                    with moce_fast.backend(backend):
                        return module(x)
            return call

        impls = {"public": run(pub), "torch": run(fast, "torch"), "triton": run(fast, "triton")}
        if compile_too:  # as bench/conftest.py CompileCase: afresh per case, static shapes
            torch._dynamo.reset()
            impls["compile"] = run(torch.compile(pub, dynamic=False))
        yield f"adapter {variant} C={dim} {side}x{side} B={batch} {str(dtype)[6:]} fwd", impls


def train_cases(batch: int, dtype, compile_too: bool):
    """The adapter's training step at issue 5's shapes as bench_adapter.py times it: gradients set
    to None, forward in train mode (batch statistics), backward of a fixed upstream gradient."""
    import moce_fast

    for variant, dim, side, fast, pub, x in _adapter_shapes(batch, dtype, True):
        x.requires_grad_()
        grad = torch.randn_like(x)

        def run(module, backend=None):
            leaves = [x, *module.parameters()]

            def call():
                for t in leaves:
                    t.grad = None
                if backend is None:
                    out = module(x)
                else:
                    with moce_fast.backend(backend):
                        out = module(x)
                out.backward(grad)
            return call

        yield (f"adapter {variant} C={dim} {side}x{side} B={batch} {str(dtype)[6:]} fwd+bwd",
               {"public": run(pub), "torch": run(fast, "torch"), "triton": run(fast, "triton")})


def moce_layer_cases(batch: int, dtype, compile_too: bool):
    import moce_fast
    from moce_fast.reference.moce import AdapterLayer

    dim, hw = 48, 128
    torch.manual_seed(0)
    fast = moce_fast.MoCELayer(dim, num_experts=4, top_k=1, freq_dim=384).cuda().to(dtype).eval()
    ref = AdapterLayer(dim, 2, num_experts=4, top_k=1, freq_dim=384, depth_type="constant", rank_type="spread",
                       complexity_scale="max").cuda().to(dtype).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(batch, dim, hw, hw, device="cuda", dtype=dtype)
    shared = torch.randn_like(x)
    freq = torch.randn(batch, 384, device="cuda", dtype=dtype)
    idx = (torch.arange(batch, device="cuda") % 4).view(batch, 1)
    gates = torch.full((batch, 1), 0.9, device="cuda", dtype=dtype)

    def fast_call(backend):
        def call():
            with torch.no_grad(), moce_fast.backend(backend):
                return fast(x, freq, shared, idx, gates)
        return call

    def ref_call():
        with torch.no_grad():
            return ref(x, freq, shared, idx, gates)

    impls = {"reference": ref_call, "torch": fast_call("torch"), "triton": fast_call("triton")}
    yield f"moce_layer C={dim} {hw}x{hw} B={batch} mixed {str(dtype)[6:]} fwd", impls


def _empty_kernel(n_ptr: int):
    """A Triton kernel that takes n_ptr pointers and does nothing but store one value: what a launch
    costs on the host as a function of its argument count (the adapter's mix kernels take ~25)."""
    import triton
    import triton.language as tl

    names = [f"p{i}" for i in range(n_ptr)]
    src = (f"def empty_{n_ptr}({', '.join(names)}, BLOCK: tl.constexpr):\n"
           f"    tl.store(p0 + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))\n")
    scope = {"tl": tl}
    exec(compile(src, f"<empty_{n_ptr}>", "exec"), scope)  # (a file-less kernel: Triton reads its source)
    fn = scope[f"empty_{n_ptr}"]
    import linecache
    linecache.cache[f"<empty_{n_ptr}>"] = (len(src), None, src.splitlines(True), f"<empty_{n_ptr}>")
    return triton.jit(fn)


def launch_cases(batch: int, dtype, compile_too: bool):
    """Where the Triton adapter's eval host time goes (batch ``batch``, IPT 16x16): a do-nothing
    Triton launch with 1, 8 and 32 pointer arguments; the adapter's kernel wrappers replayed alone on
    the arguments of a real call (grouped_linear: 1 launch; mix_tail: 2); and the adapter call with
    its kernels stubbed out (moce_fast's Python and dispatch alone). The eval call outside autograd
    runs the packed launcher (adapter_eval: 3 launches of 4-5 tensors each)."""
    import moce_fast
    from moce_fast.kernels import adapter as kernels
    sys.path.insert(0, "bench")
    from bench_adapter import _randomize

    impls = {}
    bufs = [torch.empty(64, device="cuda", dtype=dtype) for _ in range(32)]
    for n_ptr in (1, 8, 32):
        fn = _empty_kernel(n_ptr)
        impls[f"empty-{n_ptr}ptr"] = (lambda fn=fn, n_ptr=n_ptr: fn[(1,)](*bufs[:n_ptr], BLOCK=64))
    torch.manual_seed(0)
    fast = moce_fast.AdaptIRAdapter(576, "ipt", "lnc")
    _randomize(fast)
    fast = fast.cuda().eval()
    x = torch.randn(256, batch, 576, device="cuda", dtype=dtype)
    seen = {}
    names = ("grouped_linear", "mix_tail", "adapter_eval")  # staged launchers, and the packed eval one
    originals = {name: getattr(kernels, name) for name in names}

    def recorder(name):
        def rec(*a, **k):
            seen[name] = (a, k)
            return originals[name](*a, **k)
        return rec

    for name in names:
        setattr(kernels, name, recorder(name))
    try:
        with torch.no_grad(), moce_fast.backend("triton"):
            fast(x)
    finally:
        for name in names:
            setattr(kernels, name, originals[name])
    for name in names:
        if name in seen:  # (an eval call outside autograd runs the packed launcher alone)
            a, k = seen[name]
            impls[f"{name} wrapper"] = (lambda f=originals[name], a=a, k=k: f(*a, **k))

    def stubbed():
        for name in names:
            setattr(kernels, name, lambda *a, **k: None)
        try:
            with torch.no_grad(), moce_fast.backend("triton"):
                return fast(x)
        finally:
            for name in names:
                setattr(kernels, name, originals[name])

    def whole():
        with torch.no_grad(), moce_fast.backend("triton"):
            return fast(x)

    impls["adapter, kernels stubbed"] = stubbed
    impls["adapter"] = whole
    yield f"launch overhead: adapter ipt C=576 16x16 B={batch} {str(dtype)[6:]} eval", impls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="adapter,moce_layer")
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action="store_true", help="also torch.compile of the public adapter")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES),
                    help="host dtypes (the public adapter and its compile have no bfloat16 FFT: error rows)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile.py: needs a CUDA device", file=sys.stderr)
        return 2
    gens = {"adapter": adapter_cases, "train": train_cases, "moce_layer": moce_layer_cases, "launch": launch_cases}
    rows = []
    for case in args.cases.split(","):
        for b in args.batch:
            for dt in args.dtype:
                for name, impls in gens[case](b, DTYPES[dt], args.compile):
                    rows += profile_case(name, impls, args.reps)
    print(f"\n{'case':48} {'impl':10} {'sync':>8} {'queued':>8} {'graph':>8} {'kernels':>8} {'launch':>6} {'ops':>5}")
    for r in rows:
        g = r.get("graph_ms")
        g = f"{g:8.3f}" if isinstance(g, float) else "     n/a"
        if "error" in r:
            print(f"{r['case']:48} {r['impl']:10} {r['error'][:80]}")
            continue
        print(f"{r['case']:48} {r['impl']:10} {r['sync_ms']:8.3f} {r['queued_ms']:8.3f} {g} "
              f"{r['kernels_ms']:8.3f} {r['launches']:6d} {r['host_ops']:5d}  {r['top'][0][0] if r['top'] else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
