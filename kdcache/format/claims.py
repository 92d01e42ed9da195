"""Claims: which live process computes a unit, so that any number of processes and jobs share one cache.

A writer computes a unit only while it holds the unit's claim, a file in ``CACHE/claims/``:

    claims/eEEEEEE-uUUUUUU.gG.json     {"host", "boot_id", "pid", "pid_start", "token", "claimed", "lease_seconds"}
    claims/manifest.gG.json            the same, held while a writer adds epochs to the manifest

A released claim holds the same keys plus ``"released"`` (a time).

``G`` is the claim's generation. A claim file is made complete in a private temporary file and
then hard-linked to its name, which fails if the name exists: of all the processes that try to
create one generation, exactly one succeeds (on a local disk, and on NFS and Lustre, where
``link`` is atomic on the server). The holder of a unit is the maker of its highest generation.

- **Claim.** No generation exists: create generation 0. The highest one's holder is alive: skip
  the unit. It is dead: create the next generation (only one contender wins it), then remove the
  older ones. Names are never reused while a claim stands, so a takeover cannot remove a live
  claim by mistake. Having claimed, the writer looks at the ledger once more: a unit committed
  meanwhile is released at once.
- **Alive.** The same machine (host name and boot id): the pid runs and started when the claim
  says (a reused pid is not the holder). Another machine: the claim's modification time is less
  than ``lease_seconds`` old; the holder renews it (``utime``) every quarter lease from a thread,
  so a lease survives a slow unit, and expires only when its process or machine is gone.
- **Check.** Having made a generation, the writer lists the claims again: if a higher generation
  exists (made by a process whose look was newer), it removes its own and skips the unit. Of the
  processes that pass this check, only the one with the highest generation can exist at a time.
- **Release.** After the unit's ledger entry is durable the holder removes its claim file (a
  committed unit is never computed again, whoever claims it next). When it stops without
  committing (an error, SIGTERM) it rewrites its claim as released instead, keeping the
  generation in place: generations of an uncommitted unit only grow, so a name is never reused
  while that could let two processes both pass the check.

Shard files and ledger entries are written whole through a temporary file and a rename, so even
two writers that both believe they hold a unit (a lease that expired under a stalled but live
process) can only replace a file with an identical, complete one: never tear it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kdcache.format.manifest import CLAIMS_DIR, now_iso
from kdcache.location import atomic_write_bytes, fsync_dir

#: Seconds a claim of another machine stays valid without renewal (renewed every quarter of it).
DEFAULT_LEASE = 120.0

_NAME = re.compile(r"^(.+)\.g(\d+)\.json$")

#: The claim that serialises changes of the manifest (adding epochs) among writers.
MANIFEST_CLAIM = "manifest"


def unit_claim(epoch: int, unit: int) -> str:
    return f"e{epoch:06d}-u{unit:06d}"


def claim_name(key: str, generation: int) -> str:
    return f"{key}.g{generation}.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux), '' where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised command name


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: enough to judge from anywhere whether that process still runs."""

    host: str
    boot_id: str
    pid: int
    pid_start: str
    token: str
    claimed: str
    lease_seconds: float

    @staticmethod
    def this_process(lease_seconds: float) -> "Holder":
        pid = os.getpid()
        return Holder(socket.gethostname(), _boot_id(), pid, _pid_start(pid), secrets.token_hex(8), now_iso(), lease_seconds)

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


class Claims:
    """This process's claims on the units of the cache at ``path`` (a local directory)."""

    def __init__(self, path: str | os.PathLike, *, lease_seconds: float = DEFAULT_LEASE):
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds {lease_seconds}; expected a positive number")
        self.folder = Path(path) / CLAIMS_DIR
        self.me = Holder.this_process(lease_seconds)
        self.held: dict[str, Path] = {}
        self.taken_over = 0  # claims of dead holders this process took (released claims do not count)
        self.last_taken_over = False  # whether the last claim made was one
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ---- reading claims ---------------------------------------------------------------------

    def _generations(self, key: str) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(2)) for name in names if (m := _NAME.match(name)) and m.group(1) == key)

    def _read(self, path: Path) -> tuple[Holder | None | bool, float] | None:
        """(holder, None if unreadable or False if released; modification time) of a claim file; None if it is gone."""
        try:
            mtime = path.stat().st_mtime
            data = json.loads(path.read_bytes())
            if "released" in data:
                return False, mtime
            return Holder(**{name: data[name] for name in Holder.__dataclass_fields__}), mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            return None, mtime

    def _alive(self, holder: Holder | None | bool, mtime: float) -> bool:
        if holder is False:  # released by its holder
            return False
        if holder is None:  # unreadable (a file system without hard links, mid-write): judged by its age alone
            return time.time() - mtime <= DEFAULT_LEASE
        if holder.token == self.me.token:
            return True
        if holder.host == self.me.host and holder.boot_id == self.me.boot_id:
            return _pid_runs(holder.pid) and (not holder.pid_start or _pid_start(holder.pid) == holder.pid_start)
        return time.time() - mtime <= float(holder.lease_seconds)

    def live_holder(self, key: str) -> Holder | None:
        """The live process that holds the claim ``key`` (see :func:`unit_claim`), or None."""
        for generation in reversed(self._generations(key)):
            found = self._read(self.folder / claim_name(key, generation))
            if found is None:
                continue  # released or taken over just now: look at the next one down
            holder, mtime = found
            if not self._alive(holder, mtime):
                return None
            return holder or Holder("?", "", -1, "", "", "", DEFAULT_LEASE)
        return None

    # ---- claiming ---------------------------------------------------------------------------

    def try_claim(self, key: str) -> bool:
        """Claim ``key`` for this process; False if a live process holds it (or won it just now)."""
        for _ in range(8):  # the highest generation can vanish between listing and reading: look again
            generations = self._generations(key)
            died = False
            if not generations:
                generation = 0
            else:
                found = self._read(self.folder / claim_name(key, generations[-1]))
                if found is None:
                    continue
                if self._alive(*found):
                    return False
                generation, died = generations[-1] + 1, found[0] is not False  # not released: its holder died
            mine = self.folder / claim_name(key, generation)
            if not self._create(mine.name):
                return False  # another process made this generation first: it holds the claim
            if self._generations(key)[-1] != generation:  # made from a stale look: a higher generation holds it
                mine.unlink(missing_ok=True)
                return False
            for older in generations:
                (self.folder / claim_name(key, older)).unlink(missing_ok=True)
            self.last_taken_over = died
            self.taken_over += died
            with self._lock:
                self.held[key] = self.folder / claim_name(key, generation)
            self._start_heartbeat()
            return True
        return False

    def _create(self, name: str) -> bool:
        """Make the claim file ``name`` complete and exclusively: True if this process made it."""
        self.folder.mkdir(exist_ok=True)
        target = self.folder / name
        tmp = self.folder / f".{name}.{self.me.host}-{self.me.pid}-{secrets.token_hex(4)}"
        with open(tmp, "wb") as handle:
            handle.write(json.dumps(asdict(self.me)).encode())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, target)
            made = True
        except FileExistsError:
            made = False
        except OSError:
            # NFS may report a retransmitted link that succeeded as failed: the link count tells.
            # A file system without hard links gets no claim here; create-exclusive is its fallback.
            made = os.stat(tmp).st_nlink == 2 or self._create_exclusive(target)
        finally:
            tmp.unlink(missing_ok=True)
        if made:
            fsync_dir(self.folder)
        return made

    def _create_exclusive(self, target: Path) -> bool:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(asdict(self.me)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _stale_temporary(self, name: str) -> bool:
        """A claim's temporary ``.NAME.HOST-PID-RANDOM`` whose maker is gone: a dead pid here, or older than a lease."""
        host, _, rest = name.partition(".json.")[2].rpartition("-")[0].rpartition("-")
        try:
            age = time.time() - (self.folder / name).stat().st_mtime
        except FileNotFoundError:
            return False
        if host == self.me.host and rest.isdigit():
            return not _pid_runs(int(rest))
        return age > DEFAULT_LEASE

    def still_held(self, key: str) -> bool:
        """True while this process's claim is the highest generation of ``key`` (nobody took it over)."""
        with self._lock:
            path = self.held.get(key)
        if path is None or not path.exists():
            return False
        return self._generations(key)[-1:] == [int(_NAME.match(path.name).group(2))]

    def release(self, key: str, *, committed: bool = False) -> None:
        """Give the claim up: remove it once its unit is ``committed``, else mark it released.

        The mark keeps the generation in place, so generations only grow while the unit is
        uncommitted and a process acting on an old look cannot make a name that then counts.
        """
        with self._lock:
            path = self.held.pop(key, None)
        if path is None:
            return
        if committed:
            path.unlink(missing_ok=True)
        elif path.exists():
            atomic_write_bytes(path, json.dumps({**asdict(self.me), "released": now_iso()}).encode())

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)

    def forget(self, keys) -> int:
        """Remove the released or dead claims of ``keys``, units that are committed (so nobody computes them),
        and the temporaries of writers killed while making a claim."""
        keys, removed = set(keys), 0
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return 0
        for name in names:
            if name.startswith(".") and self._stale_temporary(name):  # a writer killed while making a claim
                (self.folder / name).unlink(missing_ok=True)
                continue
            match = _NAME.match(name)
            if match and match.group(1) in keys:
                found = self._read(self.folder / name)
                if found is not None and not self._alive(*found):
                    (self.folder / name).unlink(missing_ok=True)
                    removed += 1
        return removed

    # ---- the lease --------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._renew, name="kdcache-claims", daemon=True)
            self._heartbeat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.me.lease_seconds / 4):
            with self._lock:
                paths = list(self.held.values())
            for path in paths:
                try:
                    os.utime(path)
                except OSError:  # taken over (a lapsed lease) or released meanwhile; still_held tells
                    pass

    def close(self) -> None:
        """Release every claim still held (units not committed go back to the other writers)."""
        self._stop.set()
        self.release_all()

    def __enter__(self) -> "Claims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
