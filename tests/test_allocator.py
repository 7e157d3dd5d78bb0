"""``osd.allocator.compact_heap`` and ``osd train --compact-heap`` (on by default with --layerwise).

The allocator's setting is process-wide, so its effect is checked in fresh processes. By
default glibc raises its mmap threshold to the size of every mapped block it frees, so a
4 MiB block allocated again after one was freed comes from the heap (where temporaries
fragment it); after ``compact_heap()`` it gets its own mapping again (glibc's ``mallinfo2``
counts those in ``hblks``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import osd.train
from osd.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "nano", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--eval-batches", "1", "--no-progress", "--quiet"]

MAPPED_AFTER_MALLOC = """
import ctypes, sys
from osd.allocator import compact_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no-mallinfo2"); sys.exit(0)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "compact":
    assert compact_heap() is True
libc.free(libc.malloc(4 << 20))  # mapped, and by default its free raises glibc's threshold past 4 MiB
before = libc.mallinfo2().hblks
pointer = libc.malloc(4 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(pointer)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_compact_heap_serves_mid_sized_allocations_by_their_own_mapping() -> None:
    def mapped(mode: str) -> str:
        run = subprocess.run([sys.executable, "-c", MAPPED_AFTER_MALLOC, mode], capture_output=True, text=True, cwd=ROOT, check=True)
        return run.stdout.strip()

    default, compact = mapped("default"), mapped("compact")
    if "no-mallinfo2" in (default, compact):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    assert (default, compact) == ("0", "1")


@pytest.mark.parametrize(
    "flags,expected",
    [([], False), (["--layerwise"], True), (["--layerwise", "--no-compact-heap"], False), (["--compact-heap"], True)],
    ids=["plain", "layerwise", "layerwise-off", "asked"],
)
def test_osd_train_compacts_the_heap_with_layerwise_updates_or_when_asked(flags: list[str], expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(osd.train, "compact_heap", lambda: calls.append(True) or True)
    assert main([*TINY, *flags, "--out-dir", str(tmp_path / "run")]) == 0
    assert bool(calls) is expected
