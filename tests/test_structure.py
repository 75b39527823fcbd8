"""Parameter counts, state-dict names and expert shapes of the published configurations."""

from __future__ import annotations

import pytest
import torch

import moce_fast
from moce_fast.configs import get_config
from moce_fast.reference.moce import expert_depths, expert_ranks


@pytest.mark.parametrize("cls", [moce_fast.reference.MoCEIR, moce_fast.MoCEIR], ids=["reference", "fast"])
@pytest.mark.parametrize("name,n_params", [("MoCE_IR_S", 11_477_752), ("MoCE_IR", 25_353_796)])
def test_parameter_counts(cls, name, n_params):
    model = cls(**get_config(name))
    assert sum(p.numel() for p in model.parameters()) == n_params
    sd = model.state_dict()
    assert len(sd) == 1262
    assert sum(k.endswith("routing.complexity") for k in sd) == 10


def test_fast_and_reference_share_the_state_dict():
    fast = moce_fast.MoCEIR.from_config("MoCE_IR_S").state_dict()
    ref = moce_fast.reference.MoCEIR(**get_config("MoCE_IR_S")).state_dict()
    assert list(fast) == list(ref)
    assert all(fast[k].shape == ref[k].shape for k in fast)


def test_public_names_present():
    sd = moce_fast.MoCEIR.from_config("MoCE_IR").state_dict()
    for key in [
        "patch_embed.proj.weight",
        "enc.0.0.layers.0.norms.0.body.weight",
        "enc.0.0.layers.0.mixer.qkv_dwconv.weight",
        "enc.2.1.body.0.weight",
        "latent.layers.7.ffn.project_out.weight",
        "freq_embed.high_conv.0.conv.weight",
        "freq_embed.mlp.2.bias",
        "dec.0.0.body.0.weight",
        "dec.0.1.weight",
        "dec.0.2.layers.3.proj.1.bias",
        "dec.0.2.layers.0.shared.temperature",
        "dec.0.2.layers.0.mixer.kv_dwconv.weight",
        "dec.2.2.layers.1.adapter.experts.3.0.proj.2.weight",
        "dec.2.2.layers.1.adapter.experts.0.0.body.kv_dwconv.bias",
        "dec.2.2.layers.1.adapter.experts.0.0.body.norm.body.bias",
        "dec.1.2.layers.0.adapter.proj_out.weight",
        "dec.1.2.layers.0.adapter.routing.gate.2.weight",
        "dec.1.2.layers.0.adapter.routing.freq_gate.weight",
        "dec.1.2.layers.0.adapter.routing.complexity",
        "refinement.layers.3.ffn.dwconv.weight",
        "output.weight",
    ]:
        assert key in sd, key
    assert sd["dec.0.2.layers.0.adapter.routing.freq_gate.weight"].shape == (4, 384)
    assert sd["freq_embed.high_conv.0.conv.weight"][0, 0].tolist() == [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]


def test_expert_shapes_and_complexity():
    model = moce_fast.MoCEIR.from_config("MoCE_IR")
    finest = model.dec[2][2].layers[0].adapter
    assert finest.ranks == [6, 12, 24, 48]
    assert finest.patch_sizes == [4, 8, 16, 32]
    assert [sum(p.numel() for p in e.parameters()) for e in finest.experts] == [1686, 3660, 8472, 21552]
    coarse = model.dec[0][2].layers[0].adapter
    assert coarse.dim == 192
    torch.testing.assert_close(coarse.routing.complexity, torch.tensor([0.0673, 0.1512, 0.3682, 1.0]),
                               atol=5e-5, rtol=0)
    assert [len(g[2].layers) for g in model.dec] == [4, 4, 2]


def test_rank_and_depth_rules():
    assert expert_ranks(48, 2, 4, "spread") == [6, 12, 24, 48]
    assert expert_ranks(48, 2, 4, "constant") == [2, 2, 2, 2]
    assert expert_ranks(48, 2, 4, "lin") == [2, 3, 4, 5]
    assert expert_ranks(48, 2, 4, "double") == [2, 4, 6, 8]
    assert expert_ranks(48, 2, 3, "exp") == [2, 4, 8]
    assert expert_ranks(48, 2, 3, "fact") == [2, 6, 24]
    assert expert_depths(1, 4, "constant") == [1, 1, 1, 1]
    assert expert_depths(2, 3, "lin") == [2, 3, 4]
    assert expert_depths(1, 3, 5) == [5, 5, 5]
    with pytest.raises(ValueError, match="rank_type"):
        expert_ranks(48, 2, 4, "bogus")
    with pytest.raises(ValueError, match="every rank must be at least 1"):
        expert_ranks(4, 2, 4, "spread")
    with pytest.raises(ValueError, match="depth_type"):
        expert_depths(1, 4, "bogus")


def test_min_complexity_scale_and_constant_ranks_load():
    model = moce_fast.MoCEIR(**get_config("MoCE_IR_S", rank_type="constant", complexity_scale="min"))
    c = model.dec[2][2].layers[0].adapter.routing.complexity
    assert c.min().item() == 1.0 and torch.all(c == 1.0)  # equal ranks: equal complexity
