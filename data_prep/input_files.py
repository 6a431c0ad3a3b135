"""Inputs of a conversion that may lie in a bucket: the readers that open files (pydicom, PyAV) get a local
temporary copy, named neutrally (an export's file names may carry identifiers), and an object that cannot be
read is a skipped input with its reason, as a local file would be."""

from __future__ import annotations

import contextlib
import os
import tempfile

from data_prep.dicom_io import SkipVideo
from echoclip_jax.runtime import storage


@contextlib.contextmanager
def local_input(path: str, missing: str = "cannot stat the file (No such file or directory)"):
    """`path` itself when it is local; for an input in a bucket (gs://), a local temporary copy of it, for
    the readers that open files (pydicom, PyAV), deleted afterwards. An object that cannot be read is a
    SkipVideo with the reason (`missing`: the reason the local reader gives for a missing file)."""
    if not storage.is_remote(path):
        yield path
        return
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise SkipVideo(missing) from None
    except OSError as e:
        raise SkipVideo(f"cannot read the file ({type(e).__name__})") from None
    with tempfile.TemporaryDirectory(prefix="echoclip-input-") as d:
        local = os.path.join(d, "input" + os.path.splitext(path)[1])  # never the input's own name
        with open(local, "wb") as f:
            f.write(data)
        yield local
