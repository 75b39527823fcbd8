"""Once-differentiable autograd Functions that say so: moce_fast's hand-written backwards are not
themselves differentiable, and differentiating their gradients again must be a clear error."""

from __future__ import annotations

import functools

import torch


def higher_order_error(op: str) -> str:
    """The error for differentiating twice through the torch backend's hand-written backward of the
    backbone op ``op`` (the triton and cuda ops' backwards are custom ops without a derivative, and
    torch names them)."""
    return (f"moce_fast's {op!r} op has a once-differentiable backward on the torch backend, so its gradients "
            f"cannot be differentiated again; for higher-order gradients run the modules of moce_fast.reference "
            f"(the same state dicts, plain torch ops)")


class _HigherOrderError(torch.autograd.Function):
    """The identity on a once-differentiable backward's gradients when that backward is recorded
    (create_graph=True); its own backward raises ``message``."""

    @staticmethod
    def forward(ctx, message, *grads):
        ctx.message = message
        return tuple(g.detach() for g in grads)  # (aliases, not views: as torch's DelayedError)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def once_differentiable(message: str):
    """``torch.autograd.function.once_differentiable`` with ``message`` as the error: the backward
    runs without recording; under create_graph its tensor gradients come back requiring grad through
    a node whose backward raises ``message``. Unlike torch's decorator this holds also where the
    incoming gradients do not require grad (``autograd.grad(y, x, create_graph=True)`` with its
    default ones): the gradients still depend on the saved inputs, and torch's decorator then hands
    back gradients that do not require grad, so a gradient penalty would silently lose these terms."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # (autograd runs a backward with grad mode on only for create_graph)
                return out
            outs = out if isinstance(out, tuple) else (out,)
            where = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor)]
            if not where:
                return out
            wrapped = _HigherOrderError.apply(message, *(outs[i].detach().requires_grad_() for i in where))
            res = list(outs)
            for i, t in zip(where, wrapped):
                res[i] = t
            return tuple(res) if isinstance(out, tuple) else res[0]

        return wrapper

    return decorate
