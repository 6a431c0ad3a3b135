"""Where files live: every path a user gives is a local path or a `gs://` URL, read and written here.

One layer, etils `epath` (the path type Orbax takes) over fsspec + gcsfs for buckets and the OS for local
disk, so the rest of the project never calls `open`/`os.path`/`shutil` on a user's path. Orbax writes the
checkpoint arrays to the bucket itself (tensorstore) and tensorboardX its events (google-cloud-storage).

A bucket is not a disk, and the callers rely on what this module does about it:
- An object is written whole or not at all (an upload becomes visible when it completes), so `write_bytes`
  needs no temporary name on a bucket; on local disk it writes a temporary file and renames it.
- An object cannot be appended to: `JsonLines` keeps a remote file's lines and rewrites the object, at most
  every `flush_every_s` and at `close`.
- A rename is a copy and a delete, and deleting a folder deletes its objects one by one: neither is
  atomic, so nothing here relies on either being atomic on a bucket.
- Listings are not cached (fsspec's gcsfs caches them by default): a job watching a folder another job
  writes must see new objects.
- Libraries that only read or write local files (faiss, sentencepiece, safetensors) go through
  `local_copy` / `local_output`.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import io
import json
import logging
import os
import re
import tempfile
import time
from typing import Iterator

import fsspec
from etils import epath

SUPPORTED = ("a local path", "gs://bucket/path")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# one cached gcsfs client per process, its directory listings never cached (another process may write)
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


class StorageError(ValueError):
    """A path that cannot be used: an unsupported scheme, a bucket that does not exist."""


def scheme(p) -> str:
    """'gs' for a gs:// URL, '' for a local path, the scheme of any other URL."""
    m = _URL.match(os.fspath(p))
    return m.group(1).lower() if m else ""


def is_remote(p) -> bool:
    return scheme(p) != ""


def path(p) -> epath.Path:
    """`p` as an epath.Path: a local path made absolute (`~` expanded), a gs:// URL as it is."""
    s = os.fspath(p)
    sch = scheme(s)
    if sch == "gs":
        return epath.Path(s)
    if sch:
        raise StorageError(f"{s}: the scheme {sch}:// is not supported; give {' or '.join(SUPPORTED)}")
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def join(base, *parts: str) -> str:
    """`base/part/...` as a string: a URL stays a URL (os.path.join would too, but abspath would not)."""
    return os.fspath(path(base).joinpath(*parts))


def _fs():
    return fsspec.filesystem("gs")


def bucket_of(p) -> str:
    return os.fspath(p)[len("gs://") :].split("/", 1)[0]


def check(p, flag: str, *, must_exist: bool = False) -> None:
    """Start-up check of a path flag's value, before any compile or data is touched: the scheme is one this
    layer supports, a gs:// URL names a bucket that exists and this machine may list, and (`must_exist`) the
    file or folder itself exists. Raises StorageError naming the flag and the fix."""
    s = os.fspath(p)
    sch = scheme(s)
    if sch and sch != "gs":
        raise StorageError(
            f"{flag}={s}: the scheme {sch}:// is not supported; give {' or '.join(SUPPORTED)} (a FUSE-mounted "
            "bucket is a local path)"
        )
    if sch == "gs":
        bucket = bucket_of(s)
        if not bucket:
            raise StorageError(f"{flag}={s}: no bucket named; give gs://BUCKET/path")
        client_log = logging.getLogger("gcsfs")  # it logs each failed retry with a traceback: reported below
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)
        try:
            found = _fs().exists(bucket)
        except Exception as e:  # credentials, network: say which flag needed the bucket
            raise StorageError(
                f"{flag}={s}: cannot reach bucket gs://{bucket} ({type(e).__name__}: {e}); check this machine's "
                "credentials (`gcloud auth application-default login`, or the VM's service account) and network"
            ) from None
        finally:
            client_log.setLevel(level)
        if not found:
            raise StorageError(
                f"{flag}={s}: bucket gs://{bucket} does not exist or this machine's credentials cannot see it; "
                f"create it (`gcloud storage buckets create gs://{bucket} --location=<the pod's region>`) or fix "
                "the name"
            )
    if must_exist and not path(s).exists():
        raise StorageError(f"{flag}={s}: not found")


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """Names in folder `p`, sorted; [] when it does not exist."""
    d = path(p)
    if not d.is_dir():
        return []
    return sorted(c.name for c in d.iterdir())


def glob(p, pattern: str) -> list[str]:
    """Paths in folder `p` whose names match `pattern` (`*`, `?`, `[...]`; no `**`), sorted."""
    return sorted(os.fspath(c) for c in path(p).glob(pattern))


def match(pattern: str) -> list[str]:
    """Paths matching a whole glob pattern, local (`/runs/*/checkpoints/*`) or in a bucket
    (`gs://b/runs/*/checkpoints/*`), sorted."""
    if scheme(pattern) == "gs":
        return sorted(f"gs://{m}" for m in _fs().glob(pattern))
    return sorted(globlib.glob(os.fspath(path(pattern))))


def makedirs(p) -> None:
    """Creates folder `p` and its parents (a bucket has no folders: nothing to do there)."""
    if not is_remote(p):
        os.makedirs(path(p), exist_ok=True)


def rmtree(p, *, missing_ok: bool = True) -> None:
    """Deletes folder `p` (on a bucket, object by object: not atomic)."""
    d = path(p)
    if missing_ok and not d.exists():
        return
    d.rmtree()


def remove(p, *, missing_ok: bool = True) -> None:
    f = path(p)
    if missing_ok and not f.exists():
        return
    f.unlink()


def size(p) -> int:
    return path(p).stat().length


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return read_bytes(p).decode("utf-8")


def write_bytes(p, data: bytes) -> None:
    """Writes file `p` whole, creating its folder: a reader sees the old contents or the new, never a part."""
    f = path(p)
    if is_remote(p):
        f.write_bytes(data)
        return
    os.makedirs(f.parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, f)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def open(p, mode: str = "rb"):  # noqa: A001 - the storage layer's open
    """A file object for `p`. Writing creates the folder; appending is refused on a bucket (use JsonLines)."""
    if "a" in mode and is_remote(p):
        raise StorageError(f"{p}: a bucket object cannot be appended to")
    f = path(p)
    if any(c in mode for c in "wax") and not is_remote(p):
        os.makedirs(f.parent, exist_ok=True)
    return f.open(mode)


def read_range(p, start: int, length: int) -> bytes:
    """`length` bytes of file `p` from `start` (one ranged GET on a bucket)."""
    if is_remote(p):
        return _fs().cat_file(os.fspath(p), start=start, end=start + length)
    with io.open(path(p), "rb") as f:
        f.seek(start)
        return f.read(length)


def read_ranges(paths, starts: list[int], lengths: list[int]) -> list[bytes]:
    """Several ranges at once, of one file (`paths` a path) or of one file each (`paths` a list): on a bucket,
    every ranged GET in flight together (gcsfs `cat_ranges`). Raises OSError naming the first file that
    failed."""
    if not starts:
        return []
    files = [os.fspath(paths)] * len(starts) if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    if scheme(files[0]) == "gs":
        ends = [a + n for a, n in zip(starts, lengths)]
        got = _fs().cat_ranges(files, list(starts), ends, on_error="return")
        for f, g in zip(files, got):
            if isinstance(g, BaseException):
                raise OSError(f"{f}: cannot read ({type(g).__name__}: {g})") from g
        return got
    out = []
    for f, a, n in zip(files, starts, lengths):
        with io.open(path(f), "rb") as fh:
            fh.seek(a)
            out.append(fh.read(n))
    return out


@contextlib.contextmanager
def local_copy(p) -> Iterator[str]:
    """A local file path with the contents of file `p` (`p` itself when local), for libraries that read
    only local files; a temporary copy is deleted afterwards."""
    if not is_remote(p):
        yield os.fspath(path(p))
        return
    with tempfile.TemporaryDirectory(prefix="echoclip_jax-") as d:
        local = os.path.join(d, path(p).name)
        with io.open(local, "wb") as f:
            f.write(read_bytes(p))
        yield local


@contextlib.contextmanager
def local_output(p) -> Iterator[str]:
    """A local file path to write; when the block succeeds its file becomes `p` (uploaded whole, or moved
    into place on local disk), and when it fails `p` is left as it was."""
    f = path(p)
    with tempfile.TemporaryDirectory(prefix="echoclip_jax-", dir=None if is_remote(p) else _existing_parent(f)) as d:
        local = os.path.join(d, f.name)
        yield local
        if is_remote(p):
            with io.open(local, "rb") as src:
                f.write_bytes(src.read())
        else:
            os.makedirs(f.parent, exist_ok=True)
            os.replace(local, f)


def _existing_parent(f: epath.Path) -> str:
    os.makedirs(f.parent, exist_ok=True)
    return os.fspath(f.parent)


def copy(src, dst) -> None:
    """Copies file `src` to `dst` (either side local or a bucket)."""
    write_bytes(dst, read_bytes(src))


def files_under(p) -> list[str]:
    """Every file below folder `p`, as paths relative to it, sorted (one paginated listing on a bucket)."""
    root = path(p)
    if scheme(p) == "gs":
        base = os.fspath(root).rstrip("/") + "/"
        return sorted(f"gs://{f}"[len(base) :] for f in _fs().find(base))
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def copytree(src, dst) -> None:
    """Copies folder `src` into `dst` (either side local or a bucket), file by file."""
    for rel in files_under(src):
        copy(path(src) / rel, path(dst) / rel)


class JsonLines:
    """A file of JSON lines that grows: appended and flushed on local disk; on a bucket, where an object cannot
    be appended to, the lines already there are read at start and the object is rewritten whole at most every
    `flush_every_s` seconds and at `flush(force=True)`/`close` (a preemption loses at most that much)."""

    def __init__(self, p, *, flush_every_s: float = 30.0):
        self.path, self.remote, self.flush_every_s = os.fspath(p), is_remote(p), flush_every_s
        if self.remote:
            self._text = read_text(p) if exists(p) else ""
            self._dirty, self._flushed_at = False, float("-inf")  # the first line is written at once
        else:
            makedirs(os.path.dirname(os.fspath(path(p))))
            self._file = io.open(path(p), "a")

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.remote:
            self._text += line
            self._dirty = True
            self.flush()
        else:
            self._file.write(line)
            self._file.flush()

    def flush(self, force: bool = False) -> None:
        if not self.remote or not self._dirty:
            return
        if force or time.monotonic() - self._flushed_at >= self.flush_every_s:
            write_text(self.path, self._text)
            self._dirty, self._flushed_at = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        else:
            self._file.close()


def read_json_lines(p) -> list[dict]:
    return [json.loads(line) for line in read_text(p).splitlines() if line.strip()]


def dump_json(p, obj, **kw) -> None:
    write_text(p, json.dumps(obj, **kw))


def load_json(p):
    return json.loads(read_text(p))
