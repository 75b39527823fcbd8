"""Checkpoints: Lightning ``.ckpt`` (weights under "state_dict", prefix "net."), plain ``.pt``/``.pth``
state dicts, and ``.safetensors``. A checkpoint is checked whole before anything is copied, so a
bad one raises one error and leaves the model untouched."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch

log = logging.getLogger("moce_fast")

_PREFIXES = ("net.", "module.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists missing, unexpected and misshaped keys."""


def read_safetensors(source) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU), whatever its suffix; a missing or unreadable
    file raises FileNotFoundError or :class:`CheckpointError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(os.fspath(source))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {str(path)!r}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: not a readable safetensors file ({err})") from err


def is_safetensors(path) -> bool:
    """Whether the file at ``path`` is in the safetensors format, by its first bytes (a little-endian
    u64 header length, then the header's JSON object), whatever its suffix: torch.save writes a zip
    ("PK") or a pickle (0x80) there."""
    try:
        with open(os.fspath(path), "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def read_state_dict(source, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a path (.ckpt, .pt, .pth, .safetensors) or take a mapping as is.

    A safetensors file is read as one whatever its suffix (e.g. ``model.save("model.pt")``).
    Lightning checkpoints keep the model's weights under "state_dict" with the prefix "net." (the
    public training code's attribute); the prefix, or a DataParallel "module." prefix, is removed.
    Files are read with ``torch.load(weights_only=True)``; ``allow_pickle=True`` allows a full
    unpickle for checkpoints that need it (only for files you trust).
    """
    if isinstance(source, Mapping):
        raw = source
    else:
        path = Path(os.fspath(source))
        if path.suffix == ".safetensors" or is_safetensors(path):
            raw = read_safetensors(path)
        elif not path.is_file():
            raise FileNotFoundError(f"checkpoint: no file at {str(path)!r}")
        else:
            try:
                raw = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
            except pickle.UnpicklingError as err:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: torch.load(weights_only=True) refused it ({err}); if you trust "
                    f"the file, pass allow_pickle=True") from err
            except (RuntimeError, EOFError, OSError) as err:
                raise CheckpointError(f"checkpoint {str(path)!r}: not a readable torch file ({err})") from err
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint: expected a state dict (a mapping of names to tensors), got "
                              f"{type(raw).__name__}")
    for prefix in _PREFIXES:
        if raw and any(k.startswith(prefix) for k in raw):
            skipped = [k for k in raw if not k.startswith(prefix)]
            if skipped:
                log.debug("checkpoint: ignoring %d keys outside the model prefix %r: %s", len(skipped), prefix,
                          skipped[:5])
            raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
            break
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint: entries that are not tensors: {bad[:10]}")
    return dict(raw)


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], expected=None) -> None:
    """Raise one :class:`CheckpointError` naming every missing, unexpected and misshaped key.

    ``expected`` (default: the whole ``model.state_dict()``) is the mapping ``state`` must match.
    """
    expected = model.state_dict() if expected is None else expected
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: model {tuple(expected[k].shape)}, checkpoint {tuple(state[k].shape)}"
                 for k in expected if k in state and expected[k].shape != state[k].shape]
    def fmt(items):
        return f"{len(items)} {items[:8]}{' ...' if len(items) > 8 else ''}"

    if missing or unexpected or misshaped:
        raise CheckpointError(
            "checkpoint does not match the model (is it another configuration?): "
            f"missing keys: {fmt(missing)}; unexpected keys: {fmt(unexpected)}; misshaped keys: {fmt(misshaped)}")
    # a value of another kind (load_state_dict would cast an integer tensor into float weights) or
    # a non-finite weight: a corrupt or mislabelled file, not one to load
    mistyped = [f"{k}: model {expected[k].dtype}, checkpoint {state[k].dtype}" for k in expected
                if _kind(expected[k].dtype) != _kind(state[k].dtype)]
    if mistyped:
        raise CheckpointError(f"checkpoint: entries of another kind than the model's: {fmt(mistyped)}")
    non_finite = [k for k in expected if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if non_finite:
        raise CheckpointError(f"checkpoint: entries with NaN or infinite values: {fmt(non_finite)}")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def load_weights(model: torch.nn.Module, source, allow_pickle: bool = False) -> torch.nn.Module:
    """Check, then load a checkpoint into ``model`` (strict). On any error the model is unchanged."""
    state = read_state_dict(source, allow_pickle=allow_pickle)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def save_safetensors(model: torch.nn.Module, path, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``model``'s state dict as safetensors; the constructor arguments go in the metadata.
    Written to a temporary file renamed over ``path``: a failure leaves ``path`` as it was."""
    from safetensors.torch import save_file

    from .._io import atomic_write

    extra = dict(metadata or {})
    wrong = [(k, v) for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if wrong:
        raise TypeError(f"metadata: expected str keys and values (safetensors stores text), got {wrong[:3]}")
    own = sorted(set(extra) & {"format", "config", "config_name"})
    if own:  # (a file whose recorded constructor arguments were replaced would not load back)
        raise ValueError(f"metadata: {own} are keys moce_fast records itself (the format, the constructor "
                         f"arguments, the configuration name); name yours otherwise")
    meta = {"format": "moce_fast"}
    config = getattr(model, "config", None)
    if config:
        meta["config"] = json.dumps(config)
    if getattr(model, "config_name", None):
        meta["config_name"] = model.config_name
    meta.update(extra)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _metadata(source) -> dict[str, str]:
    """A safetensors file's metadata ({} for a state dict, another format or an unreadable file)."""
    if isinstance(source, Mapping) or not is_safetensors(source):
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(source), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}


def checkpoint_config_name(source) -> str | None:
    """The configuration name recorded in a moce_fast safetensors file's metadata, if any."""
    return _metadata(source).get("config_name")


def recorded_constructor(source, metadata: Mapping[str, str] | None = None) -> dict | None:
    """The constructor arguments a moce_fast safetensors file records (``MoCEIR.save``), if any
    (``metadata``: the file's, if already read); a record that is not a JSON object of arguments
    is a :class:`CheckpointError`."""
    text = (_metadata(source) if metadata is None else metadata).get("config")
    if text is None:
        return None
    try:
        args = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint '{source}': its recorded constructor arguments are not JSON ({err})") \
            from None
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise CheckpointError(f"checkpoint '{source}': its recorded constructor arguments are not a JSON object "
                              f"of named arguments, got {text[:80]!r}")
    return args


def load_checkpoint(source, config: str | None = None, allow_pickle: bool = False, **overrides):
    """Build :class:`moce_fast.MoCEIR` and load ``source`` (a path to a .ckpt/.pt/.pth/.safetensors
    file, or a state dict) into it, in eval mode. The model: configuration ``config`` with
    ``overrides``; without ``config``, the model a file written by ``MoCEIR.save`` records (its
    constructor arguments, with ``overrides`` on top), else "MoCE_IR" (the public checkpoints)."""
    from .moce_ir import MoCEIR

    recorded, meta = None, {}
    if config is None:
        meta = _metadata(source)
        recorded = recorded_constructor(source, meta)
    if recorded is not None:
        try:
            model = MoCEIR(**{**recorded, **overrides})
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint '{source}': its recorded constructor arguments do not build a "
                                  f"MoCEIR ({err})") from None
        if meta.get("config_name") and not overrides:
            model.config_name = meta["config_name"]
    else:
        model = MoCEIR.from_config(config or "MoCE_IR", **overrides)
    return load_weights(model, source, allow_pickle=allow_pickle).eval()
