"""Host memory of a training process: how much it holds (PSS of the process and its DataLoader
workers) and glibc heap tuning that keeps it from creeping up (fewer arenas, ``malloc_trim`` when
resident memory has grown). Linux/glibc; elsewhere the measurements are None and the tuning does
nothing."""

from __future__ import annotations

from pathlib import Path


def host_rss_bytes(pid: int | None = None) -> int | None:
    """Memory of a process and all its descendants (DataLoader workers), in bytes: the sum of
    their proportional set sizes (PSS: a page shared by n processes counts 1/n in each, so
    copy-on-write pages of forked workers are not counted twice as with RSS). Falls back to RSS
    without ``smaps_rollup``; None where /proc is not available."""
    import os

    root = pid or os.getpid()
    try:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
        total, todo = 0, [root]
        while todo:
            p = todo.pop()
            total += _process_memory(p)
            todo += children.get(p, [])
        return total
    except OSError:
        return None


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def limit_heap_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that contends for the heap its own arena (up to 8 per core);
    varied tensor sizes then fragment every arena and resident memory creeps up over epochs.
    Call before training starts."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_free_heap() -> None:
    """Give free heap pages back to the OS (glibc ``malloc_trim``); once per epoch is cheap."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _process_memory(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


HEAP_SLACK = 0.5
"""Free heap pages are given back once this process's resident memory has grown by this fraction
(and at least ``HEAP_SLACK_MIN`` bytes) since they were last given back."""
HEAP_SLACK_MIN = 32 * 2**20


def _resident_bytes() -> int | None:
    """Resident memory of this process alone (``/proc/self/statm``: one small read, ~10 µs)."""
    import os

    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Keeps freed-but-retained heap memory bounded during an epoch.

    glibc keeps freed memory in its arenas for reuse. With tensors of ever-changing sizes the
    arenas fragment, and a training process's resident memory climbs all through an epoch
    (docs/benchmarks.md, "Host memory": by ~50% within one epoch on the demo corpus) although
    little of it is alive. ``malloc_trim`` gives the free pages back, but each call costs tens of
    ms and the pages must be faulted in again when reused (trimming about every 5 steps slowed the
    tiny benchmark run by ~15%), so this trims only when resident memory has grown by ``slack``
    since the last trim: resident memory at the end of a step stays below ``1 + slack`` times what
    a trim leaves. Memory that is alive is never touched: a trim that frees little just raises
    the bar.
    """

    def __init__(self, slack: float = HEAP_SLACK, slack_min: int = HEAP_SLACK_MIN) -> None:
        self.slack, self.slack_min = slack, slack_min
        self.limit: int | None = None
        self.trims = 0

    def step(self) -> bool:
        """Call once per training step; True when it trimmed."""
        resident = _resident_bytes()
        if resident is None:
            return False
        if self.limit is None:
            self._set_limit(resident)
            return False
        if resident <= self.limit:
            return False
        self.trim()
        return True

    def trim(self) -> None:
        """Give free heap pages back now and measure the bar from what is left."""
        release_free_heap()
        self.trims += 1
        resident = _resident_bytes()
        if resident is not None:
            self._set_limit(resident)

    def _set_limit(self, resident: int) -> None:
        self.limit = resident + max(int(resident * self.slack), self.slack_min)
