"""The names the docs give exist: every repository path and every ``moce_fast.…`` name written in
the README, the result notes under bench/results, the docstrings and the comments, and every
Sphinx-style ``:func:`…``` (or ``:class:``, ``:meth:``, ...) reference in them.

A rename or a move that leaves a stale name behind fails here, with the file and line that names it.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP_DIRS = ("moce_fast", "kernels", "csrc", "tests", "bench", "scripts")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".sh", ".md", ".toml"}

# a repository path: not part of a longer path (torch's own csrc/..., a URL)
PATH = re.compile(r"(?<![\w/.-])((?:" + "|".join(TOP_DIRS) + r")/[\w./-]*\w)([$*<{]?)")
# moce_fast.a.b, not torch.ops.moce_fast.op (an operator's name) nor part of a longer dotted name
DOTTED = re.compile(r"(?<![\w.])(moce_fast(?:\.\w+)+)")
ROLE = re.compile(r":(?:func|class|meth|data|attr|exc):`~?([\w.]+)`")
DEFINED = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)|^\s*(\w+)\s*(?::[^=\n]*)?=", re.M)


def _files() -> list[pathlib.Path]:
    out = [ROOT / "README.md", ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    for d in TOP_DIRS:
        out += sorted(p for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in SUFFIXES
                      and "__pycache__" not in p.parts)
    this = pathlib.Path(__file__).resolve()  # (its own examples name nothing)
    return [p for p in out if p.exists() and p.resolve() != this]


FILES = _files()


def _lines(path: pathlib.Path):
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        yield f"{path.relative_to(ROOT)}:{i}", line


def _path_exists(ref: str, after: str = "") -> bool:
    """Whether the path ``ref`` exists; ``after``, the character that follows it, one of $*<{ when
    ``ref`` is the start of a pattern or a placeholder (bench/bench_$b.py), whose prefix must exist."""
    ref = ref.rstrip(".")
    if after:
        return any(ROOT.glob(ref + "*"))
    return (ROOT / ref).exists()


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _defined_names() -> set[str]:
    names = set()
    for p in FILES:
        if p.suffix == ".py":
            names.update(a or b for a, b in DEFINED.findall(p.read_text(errors="replace")))
    return names


def test_the_checks_see_the_tree():
    # (a check that reads no file, or that every pattern misses, passes whatever the docs say)
    assert len(FILES) > 80 and ROOT / "README.md" in FILES
    assert PATH.findall("see kernels/adapter.py and torch/csrc/autograd/x.h") == [("kernels/adapter.py", "")]
    assert PATH.findall("bench/bench_$b.py") == [("bench/bench_", "$")]
    assert _path_exists("bench/bench_", "$") and not _path_exists("bench/nothing_", "$")
    assert DOTTED.findall("moce_fast.ops.adapter.adaptir, not torch.ops.moce_fast.adaptir_rows") == \
        ["moce_fast.ops.adapter.adaptir"]
    assert not _path_exists("kernels/no_such_file.py") and _path_exists("kernels/adapter.py")
    assert _resolves("moce_fast.ops.adapter._TritonTrain") and not _resolves("moce_fast.ops.no_such_op")
    assert ROLE.findall("as :func:`adaptir` and :class:`~moce_fast.nn.AdaptIRAdapter`") == \
        ["adaptir", "moce_fast.nn.AdaptIRAdapter"]


def test_repository_paths_named_exist():
    missing = [f"{where}: {ref}" for p in FILES for where, line in _lines(p) for ref, after in PATH.findall(line)
               if not _path_exists(ref, after)]
    assert not missing, "paths named that do not exist:\n" + "\n".join(missing)


def test_moce_fast_names_resolve():
    pytest.importorskip("triton", reason="moce_fast.kernels needs the triton package")
    seen: dict[str, bool] = {}
    missing = []
    for p in FILES:
        for where, line in _lines(p):
            for name in DOTTED.findall(line):
                if name not in seen:
                    seen[name] = _resolves(name)
                if not seen[name]:
                    missing.append(f"{where}: {name}")
    assert seen, "no moce_fast name found in the docs"
    assert not missing, "moce_fast names that do not resolve:\n" + "\n".join(missing)


def test_sphinx_references_name_something_defined():
    defined = _defined_names()
    missing = []
    for p in FILES:
        for where, line in _lines(p):
            for ref in ROLE.findall(line):
                last = ref.split(".")[-1]
                if last not in defined and not _resolves(ref):
                    missing.append(f"{where}: {ref}")
    assert not missing, "references to names defined nowhere:\n" + "\n".join(missing)
