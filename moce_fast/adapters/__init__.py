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
import re
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..nn.adapter import AdaptIRAdapter, check_layout, run_adapters
from ..models.checkpoint import CheckpointError
from ..ops.adapter import capturing

_TASKS: contextvars.ContextVar = contextvars.ContextVar("moce_fast_adapter_tasks", default=None)


class AdaptedModule(nn.Module):
    """A target module with one adapter per task beside it: ``base(x) + adapters[task](x)``."""

    def __init__(self, base: nn.Module, adapters: dict[str, AdaptIRAdapter], layout: str, site: str = ""):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(adapters)
        self.layout = layout
        self.site = site  # the module's name in its model, for messages

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"add_adapters: the adapted module {self.site!r} returned {got} for an input of shape "
                             f"{tuple(getattr(x, 'shape', ()))}; a parallel adapter adds to an output of its input's "
                             f"shape (target a module whose output is the same shape as its input)")
        batch = _TASKS.get()
        names = None if batch is None else batch.names
        if names is None:
            if len(self.adapters) != 1:
                raise ValueError(f"tasks: this model has adapters for {sorted(self.adapters)}; choose one per image "
                                 f"with `with moce_fast.adapters.tasks([...]):`")
            return out + next(iter(self.adapters.values()))(x)
        check_layout(x, self.layout, next(iter(self.adapters.values())))
        batch_dim = 1 if self.layout == "lnc" else 0
        if len(names) != x.shape[batch_dim]:
            raise ValueError(f"tasks: expected one task name per image ({x.shape[batch_dim]}), got {len(names)}")
        unknown = sorted(set(names) - set(self.adapters))
        if unknown:
            raise ValueError(f"tasks: unknown task names {unknown}; this model has {sorted(self.adapters)}")
        # All tasks' adapters in one grouped computation per stage: each image reads its task's weights.
        return out + run_adapters(list(self.adapters.values()), x, batch.indices(tuple(self.adapters), x.device))


def _host_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """host name -> (name in ``model``, module): the model's modules under the names they have
    without adapters. An adapted site's AdaptedModule keeps the original name, the modules of its
    base keep theirs ("a.mlp.base.0" is "a.mlp.0"), and the adapters' own modules are not host
    modules."""
    out: dict[str, tuple[str, nn.Module]] = {}
    host: dict[str, str] = {"": ""}  # name in model -> host name, for the host modules seen so far
    seen: dict[str, nn.Module] = {}  # name in model -> module (named_modules lists parents first)
    for name, module in model.named_modules():
        seen[name] = module
        if not name:
            continue
        parent, _, child = name.rpartition(".")
        if parent not in host:
            continue  # inside an adapter
        if isinstance(seen[parent], AdaptedModule):
            if child == "base":  # the base answers to its site's name, as the AdaptedModule does
                host[name] = host[parent]
            continue  # (else the site's adapters)
        host[name] = f"{host[parent]}.{child}" if host[parent] else child
        out[host[name]] = (name, module)
    return out


def _task_names(tasks) -> tuple[str, ...]:
    """Distinct non-empty task names as a tuple; a string is one name, not its letters."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks: expected distinct non-empty task names, got {tasks}")
    return tasks


def _select(modules: dict[str, tuple[str, nn.Module]], targets) -> list[str]:
    """The host names of the target modules among ``modules`` (_host_modules of the model): the
    outermost of those that match."""
    if callable(targets):
        match: Callable[[str], bool] = targets
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets: {targets!r} is not a valid regular expression ({e})") from None
        match = lambda name: pattern.search(name) is not None  # noqa: E731
    else:
        raise TypeError(f"targets: expected a regex string or a predicate over module names, got "
                        f"{type(targets).__name__}")
    names = [n for n in modules if match(n)]
    # a target inside another target would be adapted twice: keep the outermost
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        raise ValueError(f"targets: {targets!r} matches no module of the model")
    # adapters do not nest: no target inside, or around, a site adapted before
    sites = [n for n, (_, m) in modules.items() if isinstance(m, AdaptedModule)]
    for n in names:
        for site in sites:
            if n.startswith(site + ".") or site.startswith(n + "."):
                where = "inside" if n.startswith(site + ".") else "around"
                raise ValueError(f"targets: {targets!r} matches {n!r}, {where} {site!r}, which has adapters already; "
                                 f"adapters do not nest (target {site!r} itself to add tasks there)")
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapters(model: nn.Module, targets, dim: int, variant: str = "ipt", layout: str = "nchw",
                 tasks: Iterable[str] = ("default",)) -> nn.Module:
    """Put AdaptIR adapters, one per task, beside every module whose name matches ``targets`` and
    freeze the rest.

    ``targets`` (a regex searched in, or a predicate over, module names) sees the names the modules
    have without adapters; of nested matches the outermost is adapted. Called again on a model with
    adapters, a target that is an adapted site gets the new tasks' adapters beside the ones it has
    (same ``dim``, ``variant`` and ``layout``; a task it has already is an error); nothing changes
    unless every target can take its adapters. New adapters are float64 on a float64 host module,
    else float32 (half-precision hosts included); at an adapted site, its adapters' dtype. Returns
    ``model`` (changed in place). Afterwards the
    new adapters' parameters require gradients, the host's do not, and earlier adapters' keep their
    flags; the ``requires_grad`` flags from before the first call are restored by
    :func:`remove_adapters`.
    """
    tasks = _task_names(tasks)
    modules = _host_modules(model)
    names = _select(modules, targets)
    device = next(model.parameters(), torch.empty(0)).device
    planned = []  # (host name, name in model, site, its new adapters): all made and checked before the model changes
    for name in names:
        actual, site = modules[name]
        if isinstance(site, AdaptedModule):
            first = next(iter(site.adapters.values()))
            have = (first.d_model, first.variant, site.layout)
            if have != (dim, variant, layout):
                raise ValueError(f"add_adapters: {name!r} has adapters of (dim, variant, layout) = {have}, the new "
                                 f"ones would be {(dim, variant, layout)}; one site's adapters share these")
            taken = sorted(set(tasks) & set(site.adapters))
            if taken:
                raise ValueError(f"tasks: {name!r} has adapters for {taken} already (it has {sorted(site.adapters)})")
        base = site.base if isinstance(site, AdaptedModule) else site
        dtype = _adapter_dtype(site, base, model)
        # new adapters follow the host's train/eval mode (their BatchNorm depends on it)
        new = {t: AdaptIRAdapter(dim, variant, layout).to(device, dtype).train(base.training) for t in tasks}
        planned.append((name, actual, site, new))
    if not hasattr(model, "_moce_fast_requires_grad"):
        model._moce_fast_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, actual, site, new in planned:
        if isinstance(site, AdaptedModule):
            site.adapters.update(new)
        else:
            _set(model, actual, AdaptedModule(site, new, layout, site=name))
    # the new adapters train, the host is frozen, earlier adapters keep their flags (a task frozen
    # with task_parameters stays frozen)
    new_params = {id(p) for *_, new in planned for a in new.values() for p in a.parameters()}
    earlier = {id(p) for _, m in _adapted(model) for p in m.adapters.parameters()} - new_params
    for p in model.parameters():
        if id(p) not in earlier:
            p.requires_grad_(id(p) in new_params)
    return model


def _adapter_dtype(site: nn.Module, base: nn.Module, model: nn.Module) -> torch.dtype:
    """The dtype of a site's new adapters: its adapters' where it has some (one site's adapters run
    as one grouped computation); else float64 for a float64 host module (the dtype of its first
    floating-point parameter, or the model's), and float32 for any other, half-precision hosts
    included (their adapters' BatchNorm statistics and small products stay in float32, as peft's
    autocast_adapter_dtype keeps LoRA weights)."""
    if isinstance(site, AdaptedModule):
        return next(iter(site.adapters.values())).head.weight.dtype
    for module in (base, model):
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.float32


def _adapted(model: nn.Module) -> list[tuple[str, AdaptedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedModule)]


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original modules back and restore the parameters' ``requires_grad`` flags."""
    for name, module in _adapted(model):  # (adapters do not nest: no site is inside another)
        _set(model, name, module.base)
    flags = getattr(model, "_moce_fast_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    if hasattr(model, "_moce_fast_requires_grad"):
        del model._moce_fast_requires_grad
    return model


def adapter_state_dict(model: nn.Module, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapters' parameters and buffers only, under their names in ``model``; with ``tasks``,
    those tasks' adapters only."""
    prefixes = _adapter_prefixes(model, tasks)
    return {k: v for k, v in model.state_dict().items() if prefixes and k.startswith(prefixes)}


def _adapter_prefixes(model: nn.Module, tasks: Iterable[str] | None) -> tuple[str, ...]:
    """The state-dict key prefixes of the adapters (of ``tasks`` only, if given) in ``model``."""
    if tasks is None:
        return tuple(f"{name}.adapters." for name, _ in _adapted(model))
    tasks = _task_names(tasks)
    have = {t for _, m in _adapted(model) for t in m.adapters}
    unknown = sorted(set(tasks) - have)
    if unknown:
        raise ValueError(f"tasks: {unknown} have no adapters in this model (it has {sorted(have)})")
    return tuple(f"{name}.adapters.{t}." for name, m in _adapted(model) for t in tasks if t in m.adapters)


def save_adapters(model: nn.Module, path, tasks: Iterable[str] | None = None) -> None:
    """Write :func:`adapter_state_dict` (of ``tasks`` only, if given) as safetensors, to a temporary
    file renamed over ``path``: a failure leaves ``path`` as it was."""
    from safetensors.torch import save_file

    from .._io import atomic_write

    if not _adapted(model):
        raise ValueError("model: has no adapters to save (call add_adapters first)")
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, tasks).items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_adapters(model: nn.Module, path, tasks: Iterable[str] | None = None) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model``'s adapters (made by add_adapters
    with the same targets and tasks). With ``tasks``, only those tasks' adapters are loaded, and the
    file's entries for other tasks are left aside (a file of several tasks into a model that serves
    one, or a model with a task more than the file). The whole selection is checked before anything
    changes: its keys and shapes against the adapters', the kind of each value (floating-point or
    integer), and that no weight is NaN or infinite."""
    from ..models.checkpoint import check_state_dict, read_safetensors

    if not _adapted(model):
        raise ValueError("model: has no adapters to load into (call add_adapters with the targets and tasks the "
                         "file was saved with first)")
    expected = adapter_state_dict(model, tasks)
    state = read_safetensors(path)
    if tasks is not None:
        names = _task_names(tasks)
        in_file = {k.rsplit(".adapters.", 1)[1].split(".", 1)[0] for k in state if ".adapters." in k}
        absent = sorted(set(names) - in_file)
        if absent:
            raise CheckpointError(f"checkpoint {str(path)!r}: has no adapters for tasks {absent} (it has "
                                  f"{sorted(in_file)})")
        sites = {k.rsplit(".adapters.", 1)[0] for k in expected}  # the sites that have any of the tasks
        prefixes = tuple(f"{site}.adapters.{t}." for site in sorted(sites) for t in names)
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
    check_state_dict(model, state, expected=expected)
    model.load_state_dict(state, strict=False)
    return model


def task_parameters(model: nn.Module, task: str) -> list[nn.Parameter]:
    """The parameters of ``task``'s adapters at every adapted site, e.g. to freeze a trained task
    while a new one trains (a task left out of a batch still gets zero gradients, which an
    optimiser with momentum or weight decay would act on):
    ``for p in task_parameters(model, "denoise"): p.requires_grad_(False)``."""
    sites = [m for _, m in _adapted(model)]
    if not any(task in m.adapters for m in sites):
        tasks_here = sorted({t for m in sites for t in m.adapters})
        raise ValueError(f"task: {task!r} has no adapters in this model (it has {tasks_here})")
    return [p for m in sites if task in m.adapters for p in m.adapters[task].parameters()]


def summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts, the adapted module names, and each one's tasks
    (``{"trainable", "total", "fraction", "adapted": [name, ...], "tasks": {name: [task, ...]}}``)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sites = _adapted(model)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1),
            "adapted": [n for n, _ in sites], "tasks": {n: sorted(m.adapters) for n, m in sites}}


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
    if isinstance(names, str):
        raise TypeError(f"tasks: expected one task name per image (a list), got the string {names!r}; for one "
                        f"task for every image of a batch of N, pass [{names!r}] * N")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"tasks: expected task names (strings), got {bad[:5]}")
    token = _TASKS.set(_TaskBatch(names))
    try:
        yield
    finally:
        _TASKS.reset(token)


__all__ = ["AdaptedModule", "adapter_state_dict", "add_adapters", "load_adapters", "remove_adapters",
           "save_adapters", "summary", "task_parameters", "tasks"]
