"""Inject AdaptIR adapters into any nn.Module, in the spirit of peft.

    model = moce_fast.adapters.add_adapters(model, r"layers\\.\\d+\\.mlp$", dim=576, variant="ipt", layout="lnc",
                                            tasks=("denoise", "derain"))
    ...train: only adapter parameters require gradients...
    with moce_fast.adapters.tasks(["denoise", "derain", "denoise"]):   # one task name per image
        out = model(batch)
    save_adapters(model, "adapters.safetensors"); load_adapters(model, "adapters.safetensors")
    remove_adapters(model)   # the original model, bitwise

Each target module's output becomes ``module(x) + adapter(x)`` (the paper's parallel placement).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..nn.adapter import AdaptIRAdapter, check_layout, run_adapters
from ..ops.adapter import capturing

_TASKS: contextvars.ContextVar = contextvars.ContextVar("moce_fast_adapter_tasks", default=None)


class AdaptedModule(nn.Module):
    """A target module with one adapter per task beside it: ``base(x) + adapters[task](x)``."""

    def __init__(self, base: nn.Module, adapters: dict[str, AdaptIRAdapter], layout: str):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(adapters)
        self.layout = layout

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        batch = _TASKS.get()
        names = None if batch is None else batch.names
        if names is None:
            if len(self.adapters) != 1:
                raise ValueError(f"tasks: this model has adapters for {sorted(self.adapters)}; choose one per image "
                                 f"with `with moce_fast.adapters.tasks([...]):`")
            return out + next(iter(self.adapters.values()))(x)
        check_layout(x, self.layout, next(iter(self.adapters.values())).d_model)
        batch_dim = 1 if self.layout == "lnc" else 0
        if len(names) != x.shape[batch_dim]:
            raise ValueError(f"tasks: expected one task name per image ({x.shape[batch_dim]}), got {len(names)}")
        unknown = sorted(set(names) - set(self.adapters))
        if unknown:
            raise ValueError(f"tasks: unknown task names {unknown}; this model has {sorted(self.adapters)}")
        # All tasks' adapters in one grouped computation per stage: each image reads its task's weights.
        return out + run_adapters(list(self.adapters.values()), x, batch.indices(tuple(self.adapters), x.device))


def _select(model: nn.Module, targets) -> list[str]:
    if callable(targets):
        match: Callable[[str], bool] = targets
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        match = lambda name: pattern.search(name) is not None  # noqa: E731
    else:
        raise TypeError(f"targets: expected a regex string or a predicate over module names, got "
                        f"{type(targets).__name__}")
    names = [n for n, m in model.named_modules() if n and match(n) and not isinstance(m, (AdaptedModule,
                                                                                          AdaptIRAdapter))]
    # a target inside another target would be adapted twice: keep the outermost
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        raise ValueError(f"targets: {targets!r} matches no module of the model")
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapters(model: nn.Module, targets, dim: int, variant: str = "ipt", layout: str = "nchw",
                 tasks: Iterable[str] = ("default",)) -> nn.Module:
    """Put AdaptIR adapters beside every module whose name matches ``targets`` and freeze the rest.

    Returns ``model`` (changed in place). Only adapter parameters require gradients afterwards; the
    previous ``requires_grad`` flags are restored by :func:`remove_adapters`.
    """
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks: expected distinct non-empty task names, got {tasks}")
    names = _select(model, targets)
    if not hasattr(model, "_moce_fast_requires_grad"):
        model._moce_fast_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    device = next(model.parameters(), torch.empty(0)).device
    for name in names:
        base = model.get_submodule(name)
        # new adapters follow the host's train/eval mode (their BatchNorm depends on it)
        adapters = {t: AdaptIRAdapter(dim, variant, layout).to(device).train(base.training) for t in tasks}
        _set(model, name, AdaptedModule(base, adapters, layout))
    for n, p in model.named_parameters():
        p.requires_grad_(".adapters." in f".{n}")
    return model


def _adapted(model: nn.Module) -> list[tuple[str, AdaptedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedModule)]


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original modules back and restore the parameters' ``requires_grad`` flags."""
    for name, module in _adapted(model):
        _set(model, name, module.base)
    flags = getattr(model, "_moce_fast_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    if hasattr(model, "_moce_fast_requires_grad"):
        del model._moce_fast_requires_grad
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' parameters and buffers only, under their names in ``model``."""
    return {k: v for k, v in model.state_dict().items() if ".adapters." in f".{k}"}


def save_adapters(model: nn.Module, path) -> None:
    """Write :func:`adapter_state_dict` as safetensors."""
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    if not state:
        raise ValueError("model: has no adapters to save (call add_adapters first)")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.fspath(path))


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load adapters saved by :func:`save_adapters`; keys and shapes are checked before anything changes."""
    from safetensors.torch import load_file

    from ..models.checkpoint import check_state_dict

    state = load_file(os.fspath(path))
    check_state_dict(model, state, expected=adapter_state_dict(model))
    model.load_state_dict(state, strict=False)
    return model


def summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts, and the adapted module names."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1),
            "adapted": [n for n, _ in _adapted(model)]}


class _TaskBatch:
    """The task names of one ``tasks`` block, and their index tensors per (site task order, device),
    made once for all the adapted sites of a model that share them."""

    def __init__(self, names: list[str]):
        self.names = names
        self._kept: dict = {}

    def indices(self, order: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """(N,) int64 indices of the names into ``order`` on ``device``. A CUDA copy goes from pinned
        memory without blocking: ``torch.tensor(list, device="cuda")`` copies from pageable memory,
        which synchronises the host with the device at every adapted site, so the host cannot queue
        work ahead of a busy GPU."""
        key = (order, device)
        task = self._kept.get(key)
        if task is None:
            position = {t: i for i, t in enumerate(order)}
            task = torch.tensor([position[n] for n in self.names], dtype=torch.int64)
            if device.type == "cuda":
                if capturing(device):
                    raise RuntimeError("tasks: the task indices of this block are first needed during CUDA-graph "
                                       "capture, where a host-to-device copy cannot be captured safely; run one "
                                       "call in the same `tasks` block before capturing")
                task = task.pin_memory().to(device, non_blocking=True)
            elif device.type != "cpu":
                task = task.to(device)
            self._kept[key] = task
        return task


@contextlib.contextmanager
def tasks(names: Iterable[str]):
    """Within the block, image i of a batch goes through the adapter of task ``names[i]``."""
    token = _TASKS.set(_TaskBatch(list(names)))
    try:
        yield
    finally:
        _TASKS.reset(token)


__all__ = ["AdaptedModule", "adapter_state_dict", "add_adapters", "load_adapters", "remove_adapters",
           "save_adapters", "summary", "tasks"]
