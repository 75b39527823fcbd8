"""Equality with the public MoCE-IR code, through recorded outputs.

tests/data/public_golden.safetensors was recorded by running the public model
(eduardzamfir/MoCE-IR, src/net/moce_ir.py at commit a1a6e74, float32, CPU) on a small
configuration (in the file's metadata) whose weights are random (stored in the file, with the
routers scaled up so images pick different experts):
- eval: each of 4 images alone (the public eval path is right only at batch 1), with the
  public eval noise switched off; the output of every MoCE layer and of the model.
- train: the batch of 4 after ``torch.manual_seed(99)``, with the public routing noise: the
  outputs, every MoCE layer's output and the averaged auxiliary loss.
The public code is not part of this repository; only its recorded outputs are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moce_fast
from conftest import rel_err

GOLDEN = Path(__file__).parent / "data" / "public_golden.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["config"])
    weights = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    return config, weights, tensors


def _build(cls, config, weights):
    model = cls(**config)
    model.load_state_dict(weights, strict=True)
    return model


def _record_adapters(model):
    outs: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: outs.setdefault(n, []).append(o.detach()))
               for n, m in model.named_modules() if n.endswith(".adapter")]
    return outs, handles


@pytest.mark.parametrize("cls", [moce_fast.reference.MoCEIR, moce_fast.MoCEIR], ids=["reference", "fast"])
@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
def test_eval_equals_public(golden, cls, batched):
    config, weights, t = golden
    model = _build(cls, config, weights).eval()
    outs, _ = _record_adapters(model)
    x = t["input"]
    with torch.no_grad():
        y = model(x) if batched else torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    # the recorded batch must exercise different experts, or this test proves little
    if batched and isinstance(model, moce_fast.MoCEIR):
        chosen = {tuple(m.last_routing[0].flatten().tolist()) for m in model.modules()
                  if isinstance(m, moce_fast.MoCELayer)}
        assert any(len(set(c)) > 1 for c in chosen), chosen
    names = sorted(k[len("eval."):] for k in t if k.startswith("eval.dec"))
    assert len(names) == 3
    for name in names:
        got = torch.cat(outs[name])
        assert rel_err(got, t[f"eval.{name}"]) < 2e-5, name
    assert rel_err(y, t["eval.output"]) < 2e-5


@pytest.mark.parametrize("cls", [moce_fast.reference.MoCEIR, moce_fast.MoCEIR], ids=["reference", "fast"])
def test_train_equals_public(golden, cls):
    """Same seed, same noise draws: same routing, outputs and auxiliary loss as the public training path."""
    config, weights, t = golden
    model = _build(cls, config, weights).train()
    outs, _ = _record_adapters(model)
    torch.manual_seed(99)
    y = model(t["input"])
    for name in sorted(k[len("train."):] for k in t if k.startswith("train.dec")):
        assert rel_err(outs[name][0], t[f"train.{name}"]) < 2e-5, name
    assert rel_err(y, t["train.output"]) < 2e-5
    assert model.aux_loss.item() == pytest.approx(t["train.aux_loss"].item(), rel=1e-5)
    model.aux_loss.backward()  # the aux loss is differentiable through the routers
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("routing.gate.2.weight"))
