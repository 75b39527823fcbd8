"""Writing files so that a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)`` then rename the temporary file over ``path`` (its folder made if
    needed): a failure leaves ``path`` as it was. A ``path`` that is a folder is an error naming it,
    and so is one that cannot be created. The file gets the permissions a plain ``open(path, "w")``
    gives, the umask's (tempfile.mkstemp's temporary file, and safetensors' save_file itself, make
    files private to their owner: every saved checkpoint was unreadable to other users)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path: {str(path)!r} is a folder; expected the path of a file to write")
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # (the umask applies)
        mode = tmp.stat().st_mode & 0o777
    except OSError as err:
        raise OSError(err.errno, f"path: cannot write {str(path)!r} ({err.strerror or err})") from err
    try:
        write_fn(str(tmp))
        os.chmod(tmp, mode)  # (a writer may have replaced the file with one of its own permissions)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
