"""All-in-one training of MoCE-IR on random crops of real photos with synthesised degradations.

Single process, or DistributedDataParallel under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl
on GPU). Checkpoints: ``model.safetensors`` (weights, with the config name in the metadata) and
``train_state.pt`` (optimizer, step, elapsed time), both written atomically; ``resume=True``
continues from them.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import DegradedCrops, bundled_photos, folder_photos, split_photos
from ..data.degrade import TASKS
from ..models import MoCEIR
from ..models.checkpoint import CheckpointError, load_weights
from ..ops import backend as use_backend
from .._io import atomic_write
from .losses import restoration_loss

log = logging.getLogger("moce_fast")

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    """What to train and how. Give ``steps`` or ``minutes`` (or both: whichever ends first)."""

    config: str = "tiny"
    tasks: tuple[str, ...] = TASKS
    data: str | None = None
    crop: int = 64
    batch_size: int = 8
    steps: int | None = None
    minutes: float | None = None
    lr: float = 2e-4
    warmup: float = 0.05
    fft_weight: float = 0.1
    aux_weight: float = 0.01
    out: str = "runs/moce_fast"
    resume: bool = False
    backend: str = "auto"
    device: str | None = None
    seed: int = 0
    save_every: int = 200
    progress: bool = True
    overrides: dict = field(default_factory=dict)

    def validate(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes (how long to train)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: expected at least 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes: expected a positive number, got {self.minutes}")
        if self.crop < 8 or self.batch_size < 1:
            raise ValueError(f"crop >= 8 and batch_size >= 1 expected, got crop={self.crop}, "
                             f"batch_size={self.batch_size}")


def load_photos(data: str | None):
    return bundled_photos() if data is None else folder_photos(data)


class _Dist:
    """Process-group bookkeeping; world size 1 without torchrun."""

    def __init__(self, device_hint: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_hint:
            self.device = torch.device(device_hint)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on rank 0 (rank 0's clock decides time limits)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


def _lr_at(cfg: TrainConfig, frac: float) -> float:
    """Linear warm-up, then cosine decay to 1% of ``lr``; ``frac`` is the fraction of training done."""
    if frac < cfg.warmup:
        return cfg.lr * max(frac / cfg.warmup, 0.01)
    p = (frac - cfg.warmup) / max(1.0 - cfg.warmup, 1e-9)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0))))


def save_checkpoint(model: MoCEIR, opt, step: int, elapsed: float, cfg: TrainConfig, out: Path):
    atomic_write(out / MODEL_FILE, lambda p: model.save(p, metadata={"step": str(step)}))
    state = {"optimizer": opt.state_dict(), "step": step, "elapsed": elapsed, "config": asdict(cfg)}
    atomic_write(out / STATE_FILE, lambda p: torch.save(state, p))


def train(cfg: TrainConfig) -> tuple[MoCEIR, dict]:
    """Train and return (model (unwrapped, in eval mode), summary dict)."""
    cfg.validate()
    ctx = _Dist(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


def _read_state(path: Path, device) -> dict:
    """The training state ``path`` holds (what :func:`save_checkpoint` wrote), or a CheckpointError naming the
    file: torch.load's own error on a damaged file told the user to retry with weights_only=False."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # (any failure to read it: a truncated zip, a pickle error, ...)
        # (torch's text for an unpickling failure suggests weights_only=False, which runs the file's code)
        reason = "damaged, or not a file torch.save wrote" if isinstance(err, pickle.UnpicklingError) else \
            (str(err).strip().splitlines() or [""])[0].split(". ")[0][:160]  # (its first sentence)
        raise CheckpointError(f"resume: {str(path)!r} is not a readable training state ({type(err).__name__}: "
                              f"{reason}); delete it to start afresh in that folder") from None
    keys = ("optimizer", "step", "elapsed")
    if not isinstance(state, dict) or not all(k in state for k in keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"resume: {str(path)!r} holds no training state: expected the keys {list(keys)}, "
                              f"got {got}")
    return state


def _train(cfg: TrainConfig, ctx: _Dist):
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = MoCEIR.from_config(cfg.config, **cfg.overrides).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    step, elapsed_before = 0, 0.0
    if cfg.resume and (out / STATE_FILE).is_file():
        state = _read_state(out / STATE_FILE, ctx.device)  # (read and checked before anything is loaded)
        load_weights(model, out / MODEL_FILE)
        opt.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state["elapsed"])
        if ctx.main:
            log.info("resumed from %s at step %d", out, step)
    elif cfg.resume and ctx.main:
        log.info("nothing to resume in %s: starting fresh", out)

    photos, _ = split_photos(load_photos(cfg.data))
    data = DegradedCrops(photos, cfg.tasks, cfg.crop, length=2 ** 62, seed=cfg.seed)
    net = model
    if ctx.world > 1:
        # Experts that get no image in a step have no gradient there: find_unused_parameters.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)
    model.train()
    bar = None
    if cfg.progress and ctx.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.config}", unit="step", dynamic_ncols=True,
                   mininterval=2.0)
    t0 = time.perf_counter()
    limit_s = None if cfg.minutes is None else cfg.minutes * 60.0
    images_seen, last = 0, {}
    with use_backend(cfg.backend):
        while True:
            elapsed = elapsed_before + time.perf_counter() - t0
            done = (cfg.steps is not None and step >= cfg.steps) or (limit_s is not None and elapsed >= limit_s)
            if ctx.any_true(done):
                break
            frac = max(step / cfg.steps if cfg.steps else 0.0, elapsed / limit_s if limit_s else 0.0)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, frac)
            base = (step * ctx.world + ctx.rank) * cfg.batch_size
            batch = [data[base + j] for j in range(cfg.batch_size)]
            degraded = torch.stack([b[0] for b in batch]).to(ctx.device)
            clean = torch.stack([b[1] for b in batch]).to(ctx.device)
            restored = net(degraded)
            loss, parts = restoration_loss(restored, clean, model.aux_loss, cfg.fft_weight, cfg.aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            images_seen += cfg.batch_size * ctx.world
            last = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
            if bar is not None:
                rate = images_seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{rate:.1f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
                bar.update(1)
            if ctx.main and cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(model, opt, step, elapsed_before + time.perf_counter() - t0, cfg, out)
    if bar is not None:
        bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    if ctx.main:
        save_checkpoint(model, opt, step, elapsed, cfg, out)
    in_sync = replicas_in_sync(model, ctx)
    summary = {"steps": step, "seconds": elapsed, "images": images_seen, "world_size": ctx.world,
               "replicas_in_sync": in_sync, **last}
    if ctx.main:
        log.info("trained %d steps in %.1f s (%d ranks); final loss %.4f", step, elapsed, ctx.world,
                 last.get("loss", float("nan")))
    return model.eval(), summary


def replicas_in_sync(model: torch.nn.Module, ctx: _Dist) -> bool:
    """Whether every rank holds the same weights (always True for one process)."""
    if ctx.world == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([1.0 if torch.equal(flat, ref) else 0.0], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
