"""What a long run leaves on disk so that a crash loses nothing: per-batch shards and the run-dir lock.

Shards (:class:`ShardStore`): one ``.npz`` per generated batch, named by its global sample range
(``batch_00000016-00000032.npz`` holds samples 16..31), holding named arrays plus a JSON ``meta`` record and a
sha256 over every array's name, dtype, shape and bytes. Writes are atomic (temp file in the same folder, fsync,
``os.replace``), so a SIGKILL at any moment leaves either the whole shard or none; a shard whose checksum fails
(disk trouble, a copy cut short) is deleted and its batch regenerated. A store is tied to a fingerprint of
everything that decides its contents; shards written under another fingerprint are never read.

Lock (:class:`RunLock`): ``run.lock`` in the run dir names the owner (host, pid, start) and a heartbeat refreshed
every :data:`HEARTBEAT_S` by a daemon thread. A lock is stale when its process is gone (same host) or its
heartbeat is older than :data:`STALE_AFTER_S` (any host): a SIGKILLed run leaves its MLflow run RUNNING and its
lock stale, and ``python -m pipeline.resume`` takes over; a live owner is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.errors import UserError

__all__ = ["ShardStore", "RunLock", "LiveProgress", "lock_owner", "atomic_write_bytes", "crash_point", "LOCK_FILE",
           "PROGRESS_DIR"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
PROGRESS_DIR = "progress"  # <run dir>/progress/<stage>/: shards, deleted when the run finishes
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0  # the "heartbeat older than 2 minutes"
PROGRESS_EVERY_S = 30.0  # how often a run's progress goes to MLflow
CRASH_ENV = "DIFFUSION_LENS_CRASH_AT"  # tests only: SIGKILL this process at a named point (see crash_point)


def crash_point(name: str) -> None:
    """Tests kill a run at exact points (``DIFFUSION_LENS_CRASH_AT=shard_written:2`` = after the second shard write)
    to prove that every moment leaves a resumable run. A no-op unless that variable names this point."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    point, _, count = want.partition(":")
    if point != name:
        return
    seen = _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if seen >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_COUNTS: dict[str, int] = {}


def atomic_write_bytes(path: Path, data: bytes, _crash: str | None = None) -> None:
    """``path`` holds ``data`` or what it held before, whatever happens: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        if _crash:
            crash_point(_crash)  # tests: killed with half a temp file on disk
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ShardStore:
    """Per-batch shards of one stage under ``directory``, valid for one ``fingerprint`` (a JSON-able dict)."""

    def __init__(self, directory: str | Path, fingerprint: Mapping[str, Any]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        file = self.dir / "fingerprint.json"
        if file.is_file() and file.read_text() != text:
            stale = list(self.dir.glob("batch_*.npz"))
            log.warning("%s: %d shard(s) of a different configuration discarded", self.dir, len(stale))
            for p in stale:
                p.unlink()
        if not file.is_file() or file.read_text() != text:
            atomic_write_bytes(file, text.encode())

    def path(self, lo: int, hi: int) -> Path:
        return self.dir / f"batch_{lo:08d}-{hi:08d}.npz"

    def write(self, lo: int, hi: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=_jsonable).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, sha256=np.frombuffer(_digest(arrays).encode(), dtype=np.uint8), **arrays)
        atomic_write_bytes(self.path(lo, hi), buf.getvalue(), _crash="shard_half_written")
        crash_point("shard_written")

    def read(self, lo: int, hi: int) -> tuple[dict[str, np.ndarray], dict] | None:
        """The shard's arrays and meta, or None when it is missing or fails its checksum (then it is deleted)."""
        path = self.path(lo, hi)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            digest = arrays.pop("sha256").tobytes().decode()
            if digest != _digest(arrays):
                raise ValueError("checksum mismatch")
        except Exception as e:  # noqa: BLE001 - truncated zip, bad header, checksum: regenerate that batch
            log.warning("shard %s unreadable (%s): its batch is generated again", path.name, e)
            path.unlink(missing_ok=True)
            return None
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        return arrays, meta

    def valid(self, batches: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        """The batches among ``batches`` whose shard is present and intact (each is read once to check)."""
        return {b for b in batches if self.read(*b) is not None}

    def clear(self) -> None:
        for p in self.dir.glob("*"):
            if p.is_file():
                p.unlink()


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


def lock_owner(run_dir: str | Path) -> dict | None:
    """The live owner of ``run_dir`` ({host, pid, started, heartbeat, age_s}), or None when unlocked or stale."""
    file = Path(run_dir) / LOCK_FILE
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    info["age_s"] = time.time() - float(info.get("heartbeat", 0))
    if info["age_s"] > STALE_AFTER_S:
        return None
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return None
    if info.get("host") == socket.gethostname() and int(info.get("pid", -1)) == os.getpid():
        return None  # ourselves (a sweep job resumed in the process that ran it)
    return info


def describe_owner(info: Mapping[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} (heartbeat {info.get('age_s', 0):.0f} s ago)"


class RunLock:
    """Owns ``run_dir`` while a run is in it: refuses a live owner, heartbeats, removes its lock on release."""

    def __init__(self, run_dir: str | Path):
        self.file = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _write(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started, "heartbeat": time.time()}
        atomic_write_bytes(self.file, json.dumps(info).encode())

    def acquire(self) -> RunLock:
        owner = lock_owner(self.file.parent)
        if owner is not None:
            raise UserError(f"run dir {self.file.parent} is in use by {describe_owner(owner)}; wait for it to end, or "
                            f"stop it (a lock is stale {STALE_AFTER_S:.0f} s after its last heartbeat)")
        self._write()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError as e:  # a full disk must not kill the run; the lock just ages
                log.warning("run lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if json.loads(self.file.read_text()).get("pid") == os.getpid():
                self.file.unlink()
        except (OSError, ValueError):
            pass


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
        from pipeline.metric_keys import PROGRESS_PREFIX

        try:
            self.tracker.log_metrics({f"{PROGRESS_PREFIX}samples_done": done, f"{PROGRESS_PREFIX}images_per_s": rate},
                                     step=done)
        except Exception as e:  # noqa: BLE001 - a progress line must never stop a run
            log.warning("could not log progress to MLflow: %s", e)

    def close(self) -> None:
        if self.new:
            self._log()
