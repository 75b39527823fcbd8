"""Checkpoints: Lightning .ckpt, .pt/.pth state dicts and safetensors; bad ones leave the model untouched."""

from __future__ import annotations

import pytest
import torch

import moce_fast
from moce_fast.models import CheckpointError, load_weights, read_state_dict
from conftest import SMALL, make_pair


@pytest.fixture()
def trained():
    fast, _ = make_pair(SMALL, seed=21, dtype=torch.float32)
    return fast


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _fresh():
    return moce_fast.MoCEIR(**SMALL)


def test_lightning_ckpt_round_trip(trained, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4}]}]}, path)
    model = load_weights(_fresh(), path)
    _assert_same_weights(model, trained)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_plain_state_dict_round_trip(trained, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save(trained.state_dict(), path)
    _assert_same_weights(load_weights(_fresh(), path), trained)


def test_safetensors_round_trip_and_outputs(trained, tmp_path):
    path = tmp_path / "model.safetensors"
    trained.save(path)
    model = load_weights(_fresh(), path).eval()
    _assert_same_weights(model, trained)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))


def test_load_checkpoint_builds_the_named_config(tmp_path):
    model = moce_fast.MoCEIR.from_config("MoCE_IR_S")
    path = tmp_path / "s.safetensors"
    model.save(path)
    loaded = moce_fast.load_checkpoint(path, config="MoCE_IR_S")
    assert not loaded.training
    _assert_same_weights(loaded, model)
    with pytest.raises(CheckpointError, match="misshaped keys"):
        moce_fast.load_checkpoint(path, config="MoCE_IR")


def test_load_checkpoint_without_config_builds_the_recorded_model(tmp_path):
    # a file MoCEIR.save wrote records its constructor arguments: load_checkpoint(path) builds that
    # model (it built MoCE_IR and failed with 993 missing keys on a saved tiny model), with
    # overrides on top; a file without a record (a public checkpoint) still means MoCE_IR
    from moce_fast.models.checkpoint import recorded_constructor
    from safetensors.torch import save_file

    tiny = moce_fast.MoCEIR.from_config("tiny")
    tiny.save(tmp_path / "tiny.safetensors")
    loaded = moce_fast.load_checkpoint(tmp_path / "tiny.safetensors")
    assert loaded.config_name == "tiny" and loaded.config == tiny.config
    _assert_same_weights(loaded, tiny)
    custom = moce_fast.MoCEIR.from_config("tiny", num_experts=3)  # a configuration with overrides
    del custom.config_name
    custom.save(tmp_path / "custom.safetensors")
    assert recorded_constructor(tmp_path / "custom.safetensors")["num_experts"] == 3
    loaded = moce_fast.load_checkpoint(tmp_path / "custom.safetensors")
    assert not hasattr(loaded, "config_name") and loaded.config["num_experts"] == 3
    _assert_same_weights(loaded, custom)
    with pytest.raises(CheckpointError, match="misshaped keys|missing keys"):  # overrides on top
        moce_fast.load_checkpoint(tmp_path / "custom.safetensors", num_experts=4)
    with pytest.raises(CheckpointError, match="missing keys"):  # an explicit config wins
        moce_fast.load_checkpoint(tmp_path / "tiny.safetensors", config="MoCE_IR_S")
    tensors = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    save_file(tensors, tmp_path / "plain.safetensors")  # no record: MoCE_IR
    assert recorded_constructor(tmp_path / "plain.safetensors") is None
    with pytest.raises(CheckpointError, match="missing keys"):
        moce_fast.load_checkpoint(tmp_path / "plain.safetensors")
    for bad, match in (("{", "not JSON"), ("[1, 2]", "not a JSON object"), ('{"dim": "x"}', "do not build a MoCEIR"),
                       ('{"no_such_argument": 1}', "do not build a MoCEIR")):
        save_file(tensors, tmp_path / "bad.safetensors", metadata={"format": "moce_fast", "config": bad})
        with pytest.raises(CheckpointError, match=f"checkpoint '.*bad.safetensors': its recorded constructor "
                                                  f"arguments .*{match}"):
            moce_fast.load_checkpoint(tmp_path / "bad.safetensors")


def test_save_metadata_is_checked(tmp_path):
    # user metadata is stored beside moce_fast's own keys: it may not replace them (a replaced
    # "config" made a file load_checkpoint could not build back), and safetensors stores only text
    tiny = moce_fast.MoCEIR.from_config("tiny")
    path = tmp_path / "m.safetensors"
    tiny.save(path, metadata={"step": "3", "note": "x"})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "3" and meta["note"] == "x" and meta["config_name"] == "tiny"
    _assert_same_weights(moce_fast.load_checkpoint(path), tiny)
    with pytest.raises(ValueError, match=r"metadata: \['config'\] are keys moce_fast records itself"):
        tiny.save(tmp_path / "b.safetensors", metadata={"config": "x"})
    with pytest.raises(TypeError, match=r"metadata: expected str keys and values .* got \[\('step', 3\)\]"):
        tiny.save(tmp_path / "b.safetensors", metadata={"step": 3})
    assert not (tmp_path / "b.safetensors").exists()


def test_state_dict_mapping_is_accepted(trained):
    sd = {f"module.{k}": v for k, v in trained.state_dict().items()}
    _assert_same_weights(load_weights(_fresh(), sd), trained)


def test_bad_checkpoint_names_keys_and_leaves_model_untouched(trained):
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(trained.state_dict())
    sd.pop("output.weight")
    sd["bogus.weight"] = torch.zeros(1)
    sd["patch_embed.proj.weight"] = torch.zeros(5, 3, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, sd)
    msg = str(info.value)
    assert "missing keys: 1 ['output.weight']" in msg
    assert "unexpected keys: 1 ['bogus.weight']" in msg
    assert "patch_embed.proj.weight: model (16, 3, 3, 3), checkpoint (5, 3, 3, 3)" in msg
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unreadable_files(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad)
    bad_pt = tmp_path / "broken.pt"
    bad_pt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="torch"):
        read_state_dict(bad_pt)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict({"a": 1})


def test_values_of_another_kind_or_not_finite_are_refused(trained):
    # load_state_dict would cast integers into float weights and copy NaNs: a corrupt or
    # mislabelled checkpoint is refused whole, and the model is unchanged
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = trained.state_dict()
    name = "patch_embed.proj.weight"
    with pytest.raises(CheckpointError, match=rf"another kind.*{name}: model torch.float32, checkpoint torch.int32"):
        load_weights(model, {**good, name: good[name].to(torch.int32)})
    for bad in (float("nan"), float("inf")):
        poisoned = good[name].clone()
        poisoned[0, 0, 1, 2] = bad
        with pytest.raises(CheckpointError, match=rf"NaN or infinite values: 1 \['{name}'\]"):
            load_weights(model, {**good, name: poisoned})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # another precision of the same kind loads (cast), as load_state_dict does
    load_weights(model, {k: v.double() if v.is_floating_point() else v for k, v in good.items()})
    _assert_same_weights(model, trained)


def test_saving_is_atomic_and_names_a_bad_path(trained, tmp_path, monkeypatch):
    # model.save and adapters.save_adapters write a temporary file renamed over the path: a failure
    # while writing leaves the file there as it was (no half-written checkpoint) and no temporary
    # file; a folder as the path is an error naming it (it was safetensors' "I/O error: Is a
    # directory"); a missing parent folder is made
    import safetensors.torch

    from moce_fast import adapters

    host = torch.nn.Sequential(torch.nn.Linear(192, 192))
    adapters.add_adapters(host, r"^0$", dim=192, variant="ipt", layout="nhwc")
    savers = {"model": lambda p: trained.save(p), "adapters": lambda p: adapters.save_adapters(host, p)}
    real_save_file = safetensors.torch.save_file

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    for name, save in savers.items():
        path = tmp_path / name / "new" / "w.safetensors"
        save(path)  # (the folders are made)
        before = path.read_bytes()
        monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
        with pytest.raises(OSError, match="disk full"):
            save(path)
        monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
        assert path.read_bytes() == before, name
        assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"], name
        with pytest.raises(IsADirectoryError, match="is a folder; expected the path of a file"):
            save(tmp_path)
        # the file's permissions are a plain open()'s (they were 0600: mkstemp's private temporary
        # file, renamed); a path that cannot be made is an error naming it, not the temporary file
        plain = path.parent / "plain"
        plain.write_bytes(b"")
        assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777), name
        blocker = tmp_path / name / "a_file"
        blocker.write_bytes(b"")
        with pytest.raises(OSError, match=rf"path: cannot write '.*{name}/a_file/w.safetensors' \("):
            save(blocker / "w.safetensors")


def test_a_safetensors_file_loads_whatever_its_suffix(trained, tmp_path):
    # model.save("model.pt") writes safetensors; the loader read it with torch.load by its suffix and
    # told the user to pass allow_pickle=True. Now the format is read from the file's first bytes.
    from moce_fast.models.checkpoint import checkpoint_config_name, is_safetensors

    path = tmp_path / "model.pt"
    trained.save(path)
    assert is_safetensors(path)
    _assert_same_weights(load_weights(_fresh(), path), trained)
    tiny = moce_fast.MoCEIR.from_config("tiny")
    tiny.save(tmp_path / "tiny.pth")
    assert checkpoint_config_name(tmp_path / "tiny.pth") == "tiny"
    torch.save(trained.state_dict(), tmp_path / "plain.pt")  # a zip: read by torch.load, as before
    assert not is_safetensors(tmp_path / "plain.pt")
    _assert_same_weights(load_weights(_fresh(), tmp_path / "plain.pt"), trained)
    for name, data in [("short.pt", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(data)  # a header longer than the file / nothing: not safetensors
        assert not is_safetensors(tmp_path / name)
        with pytest.raises(CheckpointError, match=f"checkpoint '.*{name}': "):  # (torch.load's error)
            load_weights(_fresh(), tmp_path / name)
