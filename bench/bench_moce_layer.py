"""MoCE layer: the public-style reference against moce_fast.MoCELayer, side by side in one run.

Shapes: MoCE-IR's finest decoder level (48 channels) at 128 x 128, batch 1 and 8, eval, routing
spread over the experts. "public-eval" runs the reference one image at a time, as the public eval
path must (it is correct only at batch 1); "reference" is the reference batched per expert.
Run: pytest bench/bench_moce_layer.py --benchmark-only [--benchmark-json=out.json]
"""

from __future__ import annotations

import pytest
import torch

import moce_fast
from moce_fast.reference.moce import AdapterLayer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _setup(batch, dim=48, size=128, freq_dim=384):
    torch.manual_seed(0)
    fast = moce_fast.MoCELayer(dim, num_experts=4, top_k=1, freq_dim=freq_dim).to(DEVICE).eval()
    ref = AdapterLayer(dim, 2, num_experts=4, top_k=1, freq_dim=freq_dim, depth_type="constant",
                       rank_type="spread", complexity_scale="max").to(DEVICE).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(batch, dim, size, size, device=DEVICE)
    shared = torch.randn_like(x)
    freq = torch.randn(batch, freq_dim, device=DEVICE)
    idx = (torch.arange(batch, device=DEVICE) % 4).view(batch, 1)  # every expert busy
    gates = torch.full((batch, 1), 0.9, device=DEVICE)
    return fast, ref, x, shared, freq, idx, gates


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", ["public-eval", "reference", "fast-torch"])
def test_moce_layer_forward(benchmark, impl, batch):
    fast, ref, x, shared, freq, idx, gates = _setup(batch)
    benchmark.group = f"moce_layer fwd C=48 128x128 B={batch}"

    def run():
        with torch.inference_mode():
            if impl == "public-eval":
                out = [ref(x[i:i + 1], freq[i:i + 1], shared[i:i + 1], idx[i:i + 1], gates[i:i + 1])
                       for i in range(batch)]
            elif impl == "reference":
                out = ref(x, freq, shared, idx, gates)
            else:
                with moce_fast.backend("torch"):
                    out = fast(x, freq, shared, idx, gates)
        _sync()
        return out

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
