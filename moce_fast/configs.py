"""The published MoCE-IR configurations (the training option files ``moce_ir_s`` / ``moce_ir``)."""

from __future__ import annotations

import copy

_COMMON = dict(
    levels=4,
    num_blocks=[4, 6, 6, 8],
    num_dec_blocks=[2, 4, 4],
    num_refinement_blocks=4,
    heads=[1, 2, 4, 8],
    ffn_expansion_factor=2,
    LayerNorm_type="WithBias",
    bias=False,
    rank=2,
    num_experts=4,
    topk=1,
    rank_type="spread",
    depth_type="constant",
    stage_depth=[1, 1, 1],
    with_complexity=True,
    complexity_scale="max",
)

CONFIGS: dict[str, dict] = {
    "MoCE_IR_S": dict(_COMMON, dim=32),
    "MoCE_IR": dict(_COMMON, dim=48),
    # Not published: a three-level MoCE-IR small enough to learn on a 2-core CPU in minutes (the demo).
    "tiny": dict(_COMMON, dim=16, levels=3, num_blocks=[1, 2, 2], num_dec_blocks=[1, 1],
                 num_refinement_blocks=1, heads=[1, 2, 4], stage_depth=[1, 1]),
}


def get_config(name: str, **overrides) -> dict:
    """A fresh copy of the keyword arguments of configuration ``name``, with ``overrides`` applied."""
    if name not in CONFIGS:
        raise ValueError(f"config: expected one of {sorted(CONFIGS)}, got {name!r}")
    cfg = copy.deepcopy(CONFIGS[name])
    cfg.update(overrides)
    return cfg
