"""HeapTrimmer: gives free heap pages back only when resident memory has grown past its bar."""

import pytest

from speedasr.train import host_memory
from speedasr.train.host_memory import HeapTrimmer

MIB = 2**20


@pytest.fixture
def fake_process(monkeypatch):
    """Resident memory under the test's control; a trim frees what the test says is free."""
    state = {"resident": 400 * MIB, "free": 0, "trims": 0}

    def trim():
        state["trims"] += 1
        state["resident"] -= state["free"]
        state["free"] = 0

    monkeypatch.setattr(host_memory, "_resident_bytes", lambda: state["resident"])
    monkeypatch.setattr(host_memory, "release_free_heap", trim)
    return state


def test_trims_only_past_the_bar_and_measures_the_new_bar_after_trimming(fake_process):
    heap = HeapTrimmer(slack=0.25, slack_min=32 * MIB)
    assert not heap.step()  # the first step sets the bar: 400 + 100 MiB
    assert heap.limit == 500 * MIB
    fake_process.update(resident=500 * MIB, free=60 * MIB)
    assert not heap.step()  # at the bar, not past it
    fake_process.update(resident=501 * MIB, free=61 * MIB)
    assert heap.step()
    assert fake_process["trims"] == 1 and heap.trims == 1
    assert heap.limit == 440 * MIB + 110 * MIB  # 440 left after the trim, + 25%


def test_live_growth_raises_the_bar_instead_of_trimming_every_step(fake_process):
    heap = HeapTrimmer(slack=0.25, slack_min=32 * MIB)
    heap.step()
    fake_process.update(resident=600 * MIB, free=0)  # all of it alive: the trim frees nothing
    assert heap.step()
    assert heap.limit == 750 * MIB
    fake_process.update(resident=700 * MIB)
    assert not heap.step()
    assert fake_process["trims"] == 1


def test_small_processes_use_the_minimum_slack(fake_process):
    fake_process.update(resident=40 * MIB)
    heap = HeapTrimmer(slack=0.25, slack_min=32 * MIB)
    heap.step()
    assert heap.limit == 72 * MIB


def test_without_proc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_resident_bytes", lambda: None)
    monkeypatch.setattr(host_memory, "release_free_heap", lambda: pytest.fail("trimmed"))
    heap = HeapTrimmer()
    assert not any(heap.step() for _ in range(3))


@pytest.mark.skipif(not host_memory.Path("/proc/self/status").exists(), reason="needs /proc")
def test_resident_bytes_agrees_with_vmrss():
    status = host_memory.Path("/proc/self/status").read_text()
    vmrss = next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
    )
    assert host_memory._resident_bytes() == pytest.approx(vmrss, rel=0.05)
