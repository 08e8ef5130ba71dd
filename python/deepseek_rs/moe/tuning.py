"""The per-machine choice of the expert FFN's CPU backend: timed on first use, cached on disk.

As Triton's autotuner does for kernel configurations, the first call of a shape class runs every
backend that can run it (:mod:`.backends`) on the call's own inputs (on the segments of its
first few experts when the whole call is costly, so that tuning stays within about a second),
keeps the fastest, and remembers the choice. A shape class is the pass (forward with or
without the saved pre-activations, backward with or without weight gradients), the dtype, H, F
and the rows per active expert rounded to a power of two: the quantity that decides between a
kernel that streams the weights past a few rows and a BLAS tuned for large blocks. ``torch`` is
always a candidate, and a choice made on a sample is dropped for ``torch`` if the whole call
then runs more than 10% slower than torch's did.

Choices are kept in ``experts-tuning.json`` under ``$DEEPSEEK_RS_CACHE_DIR``, else
``$XDG_CACHE_HOME/deepseek_rs``, else ``~/.cache/deepseek_rs``, keyed by what makes timings
differ between machines: CPU model, ISA tier, torch's and rayon's thread counts, torch and
deepseek-rs versions; processes sharing the file merge their choices under a file lock.
``deepseek-rs tune`` fills it ahead of time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

try:  # advisory file locks: POSIX only; elsewhere the last writer of a key wins
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import deepseek_rs

from . import backends

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPSEEK_RS_CACHE_DIR"
CACHE_FILE = "experts-tuning.json"
_FORMAT = 1


def cache_dir() -> Path:
    """Where tuning choices are kept (see the module's documentation)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepseek_rs"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key() -> str:
    """What a timing depends on besides the shape: choices are only reused under the same key
    (torch's threads run the torch backends, rayon's the Rust kernels)."""
    return (
        f"{cpu_model()} | isa={backends.cpu_isa()} | threads={torch.get_num_threads()} | "
        f"rayon={os.environ.get('RAYON_NUM_THREADS') or os.cpu_count()} | "
        f"torch={torch.__version__} | deepseek_rs={deepseek_rs.__version__}"
    )


def rows_bucket(expert_offsets: Tensor) -> int:
    """Rows per active expert, rounded to the nearest power of two (0 when there are no rows)."""
    counts = expert_offsets.diff()
    active = int((counts > 0).sum())
    if active == 0:
        return 0
    return 1 << max(0, round(math.log2(int(expert_offsets[-1]) / active)))


def shape_class(pass_: str, buf: Tensor, down_proj: Tensor, expert_offsets: Tensor) -> str:
    """The key of a call's choice: ``pass_`` is ``forward`` (inference), ``forward-train`` (the
    pre-activations saved), ``backward`` or ``backward-data`` (no weight gradients)."""
    dtype = str(buf.dtype).removeprefix("torch.")
    h, f = down_proj.shape[1], down_proj.shape[2]
    return f"{pass_} {dtype} H={h} F={f} rows/expert~{rows_bucket(expert_offsets)}"


@dataclass
class Choice:
    """A tuned choice: the backend and the best time of every candidate (seconds)."""

    backend: str
    times_s: Dict[str, float]
    tuning_s: float  # what the first call spent timing the candidates
    when: float = field(default_factory=time.time)


class Tuner:
    """Chooses a backend per shape class by timing the candidates once.

    ``budget_s`` bounds the timing a first call does beyond one warm-up call of each candidate
    and one timed call of those close to the best. ``spent_s`` adds up the time spent tuning in
    this process, ``last`` holds the latest ``(shape class, backend)`` by pass, for reports.
    """

    ROUNDS = 4  # one warm-up round, then up to three timed rounds of the close candidates

    def __init__(self, path: Optional[Path] = None, budget_s: float = 1.0):
        self._path = path
        self.budget_s = budget_s
        self._lock = threading.RLock()
        self._tables: Dict[str, Dict[str, Choice]] = {}
        self._write_failed = False
        self.spent_s = 0.0
        self.last: Dict[str, Tuple[str, str]] = {}

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / CACHE_FILE

    # ---- the cache file ----------------------------------------------------------------------

    def _read_file(self) -> Dict[str, Dict[str, dict]]:
        """The file's machines, each a dict of raw records (anything else is dropped, warned)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring the unreadable tuning cache %s: %s", self.path, e)
            return {}
        machines = data.get("machines") if isinstance(data, dict) and data.get("format") == _FORMAT else None
        if not isinstance(machines, dict):
            log.warning("ignoring the tuning cache %s: not a format-%d cache file", self.path, _FORMAT)
            return {}
        good = {m: t for m, t in machines.items() if isinstance(t, dict)}
        if len(good) < len(machines):
            log.warning("ignoring malformed machine entries of the tuning cache %s", self.path)
        return good

    @staticmethod
    def _choice(rec: object) -> Optional[Choice]:
        """A record of the file as a Choice, or None if it is not a well-formed one."""
        if not isinstance(rec, dict):
            return None
        try:
            choice = Choice(**rec)
        except TypeError:
            return None
        times = choice.times_s
        well_formed = (
            choice.backend in backends.BACKENDS
            and isinstance(times, dict)
            and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in times.items())
            and isinstance(choice.tuning_s, (int, float))
        )
        return choice if well_formed else None

    def _table(self, machine: str) -> Dict[str, Choice]:
        table = self._tables.get(machine)
        if table is None:
            table = {}
            for key, rec in self._read_file().get(machine, {}).items():
                choice = self._choice(rec)
                if choice is None:
                    log.warning("ignoring a malformed entry of the tuning cache %s: %r", self.path, key)
                else:
                    table[key] = choice
            self._tables[machine] = table
        return table

    def _save(self, machine: str, key: str, choice: Optional[Choice]) -> None:
        """Write one key of this machine (``None``: remove it) into the file, under a lock,
        keeping every other entry, so that processes sharing the cache keep each other's."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                machines = self._read_file()
                entries = machines.setdefault(machine, {})
                if choice is None:
                    entries.pop(key, None)
                else:
                    entries[key] = asdict(choice)
                payload = json.dumps({"format": _FORMAT, "machines": machines}, indent=1, sort_keys=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-", suffix=".json")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(payload)
                os.replace(tmp, self.path)
        except OSError as e:
            if not self._write_failed:
                log.warning("cannot write the tuning cache %s (%s): choices stay in memory", self.path, e)
            self._write_failed = True

    # ---- choosing ----------------------------------------------------------------------------

    def lookup(self, key: str) -> Optional[Choice]:
        """The choice cached for ``key`` on this machine, if any."""
        with self._lock:
            return self._table(machine_key()).get(key)

    def choices(self) -> Dict[str, Choice]:
        """Every choice cached for this machine."""
        with self._lock:
            return dict(self._table(machine_key()))

    def record(self, key: str, choice: Choice) -> None:
        """Cache ``choice`` for ``key`` on this machine."""
        with self._lock:
            machine = machine_key()
            self._table(machine)[key] = choice
            self._save(machine, key, choice)

    def forget(self, key: str) -> None:
        """Drop this machine's choice for ``key``: the next call times the candidates again."""
        with self._lock:
            machine = machine_key()
            if self._table(machine).pop(key, None) is not None:
                self._save(machine, key, None)

    def clear(self) -> None:
        """Forget every choice, in memory and on disk (all machines)."""
        with self._lock:
            self._tables.clear()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def cached(self, pass_: str, key: str, names) -> Optional[str]:
        """The cached backend for ``key`` if it is one of ``names`` (noted in ``last``), else None."""
        choice = self.lookup(key)
        if choice is None or choice.backend not in names:
            return None
        self.last[pass_] = (key, choice.backend)
        return choice.backend

    def choose(self, pass_: str, key: str, candidates: Dict[str, Callable[[], object]]) -> str:
        """The backend for ``key``: the cached choice, else the fastest of ``candidates`` (each a
        call of one backend on a sample of the problem), timed now and cached."""
        backend = self.cached(pass_, key, candidates)
        if backend is not None:
            return backend
        # Timing holds the lock: two threads tuning at once would time each other's load.
        with self._lock:
            choice = self.lookup(key)  # another thread may have tuned it meanwhile
            if choice is None or choice.backend not in candidates:
                choice = self._time(candidates)
                self.record(key, choice)
                log.info("tuned %s: %s (%s)", key, choice.backend, choice.times_s)
        self.last[pass_] = (key, choice.backend)
        return choice.backend

    def _time(self, candidates: Dict[str, Callable[[], object]]) -> Choice:
        """One warm-up call of each candidate (first-use costs: allocations, page faults), then
        timed rounds of those within 1.5x of the best warm-up, while within ``budget_s``."""
        start = time.perf_counter()

        def timed(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        warm = {name: timed(fn) for name, fn in candidates.items()}
        best = dict(warm)
        close = [name for name, t in warm.items() if t <= 1.5 * min(warm.values())]
        rounds = 0
        while rounds < self.ROUNDS - 1 and (rounds == 0 or time.perf_counter() - start < self.budget_s):
            for name in close:
                best[name] = min(best[name] if rounds else float("inf"), timed(candidates[name]))
            rounds += 1
        backend = min(best, key=best.__getitem__)
        spent = time.perf_counter() - start
        self.spent_s += spent
        return Choice(backend, best, spent)


TUNER = Tuner()


@contextlib.contextmanager
def isolated(path: Path) -> Iterator[Tuner]:
    """Within the block, the ops tune afresh into ``path`` instead of the user's cache (so that a
    benchmark measures, and reports, the first-call cost)."""
    global TUNER
    previous, TUNER = TUNER, Tuner(path)
    try:
        yield TUNER
    finally:
        TUNER = previous


__all__ = [
    "CACHE_ENV",
    "TUNER",
    "Choice",
    "Tuner",
    "cache_dir",
    "cpu_model",
    "isolated",
    "machine_key",
    "rows_bucket",
    "shape_class",
]
