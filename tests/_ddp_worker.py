"""Run by tests/test_train.py under torchrun: a few DDP training steps, then each rank saves its weights."""

import json
import os
import sys

import torch

from moce_fast.train import TrainConfig, train

out = sys.argv[1]
torch.set_num_threads(1)
model, summary = train(TrainConfig(config="tiny", tasks=("noise25", "rain", "haze"), crop=32, batch_size=2, steps=3,
                                   out=os.path.join(out, "run"), progress=False, save_every=0))
rank = int(os.environ["RANK"])
model.save(os.path.join(out, f"rank{rank}.safetensors"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(summary, f)
