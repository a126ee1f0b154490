"""What a long run leaves on disk so that a crash loses nothing: per-batch shards and the run-dir lock.

Verified files (:func:`save_verified` / :func:`load_verified`): an ``.npz`` of named arrays plus a JSON ``meta``
record and a sha256 over every array's name, dtype, shape and bytes (:func:`array_digest`), loaded with
``allow_pickle=False`` (a file read back is data, never code). Writes are atomic (temp file in the same folder,
fsync, ``os.replace``), so a SIGKILL at any moment leaves either the whole file or none. Shards and the metrics
mode's reference-feature cache are such files.

Shards (:class:`ShardStore`): one verified file per generated batch, named by its global sample range
(``batch_00000016-00000032.npz`` holds samples 16..31) and recording that range in its meta. A shard that fails its
checksum (disk trouble, a copy cut short) or whose recorded range or ``indices`` do not match its file name (a
shard copied over another's name) is deleted, with a warning naming it, and its batch regenerated. A store is tied
to a fingerprint of everything that decides its contents; shards written under another fingerprint are never read.

Lock (:class:`RunLock`): ``run.lock`` in the run dir names the owner (host, pid, start, a random token) and a
heartbeat refreshed every :data:`HEARTBEAT_S` by a daemon thread. A lock is stale when its process is gone (same
host) or its heartbeat is older than :data:`STALE_AFTER_S` (any host): a SIGKILLed run leaves its MLflow run
RUNNING and its lock stale, and ``python -m pipeline.run.resume`` takes over; a live owner is refused. Every check and
write of the lock happens under an exclusive ``fcntl.flock`` of the lock file itself (written in place, never
replaced), so of N processes acquiring a free or stale lock at the same moment exactly one gets it; a heartbeat
or a release touches the file only while it still holds the owner's token.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from pipeline.core.metric_keys import PROGRESS_PREFIX
from pipeline.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: the lock is checked but not taken atomically (see RunLock)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ShardStore",
    "RunLock",
    "LiveProgress",
    "lock_owner",
    "atomic_write_bytes",
    "array_digest",
    "save_verified",
    "load_verified",
    "crash_point",
    "LOCK_FILE",
    "PROGRESS_DIR",
]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
PROGRESS_DIR = "progress"  # <run dir>/progress/<stage>/: shards, deleted when the run finishes
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0  # the "heartbeat older than 2 minutes"
PROGRESS_EVERY_S = 30.0  # how often a run's progress goes to MLflow
CRASH_ENV = "DIFFUSION_LENS_CRASH_AT"  # tests only: SIGKILL this process at a named point (see crash_point)


def crash_point(name: str) -> None:
    """Tests stop a run at exact points (``DIFFUSION_LENS_CRASH_AT=shard_written:2`` = SIGKILL after the second
    shard write; ``stage_schedule:2:SIGINT`` = Ctrl-C when the second schedule stage starts; ``closing:1:SIGTERM``)
    to prove that every moment leaves a resumable run, with the signal sent at a point the test controls rather
    than after a sleep. A no-op unless that variable names this point."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    point, _, rest = want.partition(":")
    if point != name:
        return
    count, _, signame = rest.partition(":")
    seen = _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if seen == int(count or 1) or (seen > int(count or 1) and not signame):
        import signal

        os.kill(os.getpid(), getattr(signal, signame or "SIGKILL"))


_CRASH_COUNTS: dict[str, int] = {}


def atomic_write_bytes(path: Path, data: bytes, _crash: str | None = None) -> None:
    """``path`` holds ``data`` or what it held before, whatever happens: temp file (per process, so parallel writers
    never share one), fsync, rename. A failed write (full disk) removes its temp file and raises."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            if _crash:
                crash_point(_crash)  # tests: killed with half a temp file on disk
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error says more
        raise


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_verified(path: Path, arrays: Mapping[str, Any], meta: Mapping[str, Any], _crash: str | None = None) -> None:
    """Write ``arrays`` (numeric numpy arrays) and ``meta`` (JSON-able) to ``path`` as an ``.npz`` whose ``sha256``
    array covers everything else, atomically (:func:`atomic_write_bytes`). Read back with :func:`load_verified`."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if "meta" in arrays or "sha256" in arrays:
        raise ValueError("save_verified: 'meta' and 'sha256' are reserved array names")
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=_jsonable).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, sha256=np.frombuffer(array_digest(arrays).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(path, buf.getvalue(), _crash=_crash)


def load_verified(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and meta :func:`save_verified` wrote to ``path``. Raises ``ValueError`` saying what is wrong when
    the file is not one (truncated or corrupt zip, missing checksum, checksum mismatch, object arrays, bad meta)
    and ``OSError`` when it cannot be read; nothing in the file is ever unpickled."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except OSError:
        raise  # the file cannot be read at all (permissions, I/O error): the caller says so
    except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, a pickled or plain .npy file
        raise ValueError(f"not a readable .npz ({type(e).__name__}: {e})") from e
    if "sha256" not in arrays or "meta" not in arrays:
        raise ValueError(f"no checksum or meta record (arrays: {sorted(arrays)})")
    stored = arrays.pop("sha256")
    if stored.dtype != np.uint8 or stored.tobytes().decode("ascii", "replace") != array_digest(arrays):
        raise ValueError("checksum mismatch (the file changed after it was written)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except ValueError as e:
        raise ValueError(f"meta record is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"meta record is a {type(meta).__name__}, expected an object")
    return arrays, meta


class ShardStore:
    """Per-batch shards of one stage under ``directory``, valid for one ``fingerprint`` (a JSON-able dict)."""

    def __init__(self, directory: str | Path, fingerprint: Mapping[str, Any]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        file = self.dir / "fingerprint.json"
        try:
            recorded = file.read_bytes().decode() if file.is_file() else None
        except (OSError, UnicodeDecodeError):
            recorded = ""  # unreadable: as good as another configuration's
        if recorded is not None and recorded != text:
            stale = list(self.dir.glob("batch_*.npz"))
            log.warning("%s: %d shard(s) of a different configuration discarded", self.dir, len(stale))
            for p in stale:
                p.unlink()
        if recorded != text:
            atomic_write_bytes(file, text.encode())

    def path(self, lo: int, hi: int) -> Path:
        return self.dir / f"batch_{lo:08d}-{hi:08d}.npz"

    def write(self, lo: int, hi: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Shard of samples ``lo..hi-1``; its meta records that range (checked by :meth:`read`). An ``indices``
        array, when given, must list global sample indices within it."""
        save_verified(self.path(lo, hi), arrays, {**meta, "span": [int(lo), int(hi)]}, _crash="shard_half_written")
        crash_point("shard_written")

    def read(self, lo: int, hi: int) -> tuple[dict[str, np.ndarray], dict] | None:
        """The shard's arrays and meta, or None when it is missing, fails its checksum, or holds another range than
        its file name says (then it is deleted, with a warning naming it, and its batch is generated again)."""
        path = self.path(lo, hi)
        if not path.is_file():
            return None
        try:
            arrays, meta = load_verified(path)
            _check_span(arrays, meta, lo, hi)
        except (OSError, ValueError) as e:  # truncated zip, bad header, checksum, copied shard: regenerate it
            log.warning("shard %s rejected: %s; deleted, its batch is generated again", path, e)
            path.unlink(missing_ok=True)
            return None
        meta.pop("span")
        return arrays, meta

    def valid(self, batches: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        """The batches among ``batches`` whose shard is present and intact (each is read once to check)."""
        return {b for b in batches if self.read(*b) is not None}

    def clear(self) -> None:
        for p in self.dir.glob("*"):
            if p.is_file():
                p.unlink()


def _check_span(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], lo: int, hi: int) -> None:
    """A shard must hold the samples its file name says: the range recorded in its meta, and every entry of its
    ``indices`` (the valid samples' global indices, increasing; images with NaN/Inf are left out) within it."""
    span = meta.get("span")
    if span != [lo, hi]:
        raise ValueError(
            f"it records samples {span} but its name says [{lo}, {hi}] (a shard copied over another's name?)"
            if span is not None
            else "it records no sample range (written by an older version)"
        )
    idx = arrays.get("indices")
    if idx is not None:
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or len(idx) > hi - lo:
            raise ValueError(f"its indices array ({idx.dtype}, shape {idx.shape}) cannot list samples {lo}..{hi - 1}")
        if len(idx) and (idx[0] < lo or idx[-1] >= hi or (len(idx) > 1 and bool((np.diff(idx) <= 0).any()))):
            raise ValueError(
                f"its indices (first {idx[:4].tolist()}, last {int(idx[-1])}) are not increasing samples "
                f"within [{lo}, {hi})"
            )


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --------------------------------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _parse_lock(text: str) -> dict | None:
    """The owner record of a lock file's text; None when empty or not a record (a writer that died mid-write)."""
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            return None
        info["pid"], info["heartbeat"] = int(info.get("pid", -1)), float(info.get("heartbeat", 0))
    except (ValueError, TypeError):
        return None
    return info


def _live(info: dict | None) -> dict | None:
    """``info`` with its ``age_s`` when its owner is alive: a fresh heartbeat and, on this host, a running pid other
    than this process (a sweep job resumed in the process that ran it takes its own lock over)."""
    if info is None:
        return None
    info["age_s"] = time.time() - info["heartbeat"]
    if info["age_s"] > STALE_AFTER_S:
        return None
    if info.get("host") == socket.gethostname() and (info["pid"] == os.getpid() or not _pid_alive(info["pid"])):
        return None
    return info


def lock_owner(run_dir: str | Path) -> dict | None:
    """The live owner of ``run_dir`` ({host, pid, started, heartbeat, token, age_s}), or None when unlocked or
    stale (read under a shared lock, so never a half-written record)."""
    file = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return None
    try:
        _flock(fd, shared=True)
        return _live(_parse_lock(_read_fd(fd)))
    except OSError:
        return None
    finally:
        os.close(fd)  # closing releases the lock


def describe_owner(info: Mapping[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} (heartbeat {info.get('age_s', 0):.0f} s ago)"


_NO_FLOCK = {
    errno.ENOLCK,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    errno.EINVAL,
}  # file systems without flock (some FUSE, Lustre)


def _flock(fd: int, shared: bool = False) -> bool:
    """Block until ``fd`` holds an exclusive (or shared) flock; False where the file system has none."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return False
        raise
    return True


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class RunLock:
    """Owns ``run_dir`` while a run is in it: refuses a live owner, heartbeats, removes its lock on release.

    Atomic: :meth:`acquire` opens ``run.lock`` (creating it empty when absent), takes an exclusive ``flock`` on it,
    makes sure the path still names the file it locked (a releasing owner may have just deleted it), and only then
    reads the owner record and, when there is none or it is stale, writes its own in place. Every process that
    acquires, heartbeats or releases does so under that flock, so racing acquirers are serialised and exactly one
    finds the lock free. A heartbeat or release that finds another owner's token (this run was stalled for more than
    :data:`STALE_AFTER_S` and another process took over) leaves the file alone and says so. Where the file system
    offers no flock, a warning says that two runs started in the same instant could both start."""

    def __init__(self, run_dir: str | Path):
        self.file = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()
        self.token = uuid.uuid4().hex  # tells this owner from an earlier one of the same pid

    def _record(self) -> bytes:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "heartbeat": time.time(),
                "token": self.token,
            }
        ).encode()

    def _mine(self, info: dict | None) -> bool:
        return info is not None and info.get("token") == self.token and info.get("pid") == os.getpid()

    @contextmanager
    def _locked(self, create: bool) -> Iterator[int | None]:
        """An fd of the file at ``self.file`` under an exclusive flock (None when ``create`` is False and there is no
        lock file). Retries when the file it locked was deleted or replaced meanwhile."""
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                if create:
                    raise
                yield None
                return
            try:
                if not _flock(fd):
                    _warn_no_flock(self.file)
                    yield fd
                    return
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.file))
                except FileNotFoundError:
                    same = False
                if same:
                    yield fd
                    return
            finally:
                os.close(fd)  # closing releases the flock

    def _write(self, fd: int) -> None:
        """The record in place, padded with spaces (valid JSON) to whole 512-byte blocks: every heartbeat rewrites the
        same allocated bytes, so a full disk cannot leave the file empty half-way."""
        data = self._record()
        data += b" " * (-len(data) % 512)
        os.pwrite(fd, data, 0)
        if os.fstat(fd).st_size != len(data):
            os.ftruncate(fd, len(data))
        os.fsync(fd)

    def acquire(self) -> RunLock:
        try:
            with self._locked(create=True) as fd:
                owner = _live(_parse_lock(_read_fd(fd)))
                if owner is not None:
                    raise UserError(
                        f"run dir {self.file.parent} is in use by {describe_owner(owner)}; wait for it to "
                        f"end, or stop it (a lock is stale {STALE_AFTER_S:.0f} s after its last heartbeat)"
                    )
                self._write(fd)  # free, empty, or stale: ours now
        except OSError as e:
            raise UserError(
                f"cannot take the run lock {self.file}: {e}; the run dir must be writable (set "
                "hydra.run.dir=DIR or paths.outputs=DIR elsewhere)"
            ) from e
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def refresh(self) -> bool:
        """Write a fresh heartbeat if this is still the owner; False (and a warning) when another process holds the
        lock now or the file is gone. A file with no record (damaged) is rewritten: nobody else owns it."""
        with self._locked(create=False) as fd:
            info = _parse_lock(_read_fd(fd)) if fd is not None else None
            if self._mine(info) or (fd is not None and info is None):
                self._write(fd)
                return True
        log.warning(
            "run lock %s is no longer this run's (%s): heartbeats stopped; another process may be writing "
            "to this run dir",
            self.file,
            f"now {describe_owner(_live(info) or info)}" if info else "no owner record",
        )
        return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.refresh():
                    return
            except OSError as e:  # a full disk must not kill the run; the lock just ages
                log.warning("run lock heartbeat failed: %s", e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._locked(create=False) as fd:
                if fd is not None and self._mine(_parse_lock(_read_fd(fd))):
                    self.file.unlink()  # under the flock: a waiting acquirer then sees the path gone and retries
        except OSError as e:
            log.warning("could not remove run lock %s: %s; delete it once no run uses that dir", self.file, e)


_WARNED_NO_FLOCK: set[str] = set()


def _warn_no_flock(file: Path) -> None:
    if str(file.parent) not in _WARNED_NO_FLOCK:
        _WARNED_NO_FLOCK.add(str(file.parent))
        log.warning(
            "%s: this file system offers no flock, so the run lock is checked but not taken atomically; do not "
            "start two runs in this run dir at the same moment",
            file,
        )


# ----------------------------------------------------------------------------------------------- live progress
class LiveProgress:
    """``progress/samples_done`` and ``progress/images_per_s`` as stepped MLflow metrics (step = samples done) about
    every ``every_s`` seconds, so a long run's progress shows in the MLflow UI while it runs. MLflow only: never in
    ``results.json`` (reproduce, compare and sweep summaries do not see them). Under ``torchrun`` rank 0 logs its own
    count times the world size (an estimate: ranks hold equal shards)."""

    def __init__(self, tracker: Any, total: int, done: int = 0, scale: int = 1, every_s: float | None = None):
        self.tracker, self.total, self.done, self.scale = tracker, total, done, scale
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.t0 = self.last = time.perf_counter()
        self.new = 0  # images made by this attempt (the rate ignores those of an earlier attempt)

    def update(self, n: int) -> None:
        self.done += n
        self.new += n
        if time.perf_counter() - self.last >= self.every_s:
            self._log()

    def _log(self) -> None:
        self.last = now = time.perf_counter()
        if self.tracker is None:
            return
        done = min(self.done * self.scale, self.total)
        rate = self.new * self.scale / max(now - self.t0, 1e-9)

        try:
            self.tracker.log_metrics(
                {f"{PROGRESS_PREFIX}samples_done": done, f"{PROGRESS_PREFIX}images_per_s": rate}, step=done
            )
        except Exception as e:  # noqa: BLE001 - a progress line must never stop a run
            log.warning("could not log progress to MLflow: %s", e)

    def close(self) -> None:
        if self.new:
            self._log()
