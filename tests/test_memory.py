import ctypes
import os
import subprocess
import sys

import pytest

import cli
import ncf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bytes glibc holds in mmap'd blocks while a 64 MiB tensor is alive, before and after
# cli.reuse_freed_memory(): in a fresh process, so the suite's own setting does not leak in.
MAPPED_WHILE_ALLOCATED = """
import ctypes
import cli
import torch

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Mallinfo2

def mapped_growth():
    before = mallinfo2().hblkhd
    tensor = torch.empty(2 ** 26, dtype=torch.uint8)
    return mallinfo2().hblkhd - before

print(mapped_growth(), cli.reuse_freed_memory(), mapped_growth())
"""


def glibc_with_mallinfo2():
    try:
        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc 2.33 or later")
def test_large_tensors_come_from_the_heap_after_reuse_is_asked():
    output = subprocess.run([sys.executable, "-c", MAPPED_WHILE_ALLOCATED], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    default, switched, reused = int(output[0]), output[1], int(output[2])
    assert default >= 2 ** 26  # glibc's default: a fresh mapping for the 64 MiB block
    assert switched == "True"
    assert reused == 0


def test_without_mallopt_nothing_changes(monkeypatch):
    class NoMallopt:
        pass

    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: NoMallopt())
    assert cli.reuse_freed_memory() is False


def test_training_asks_for_reuse(monkeypatch, tiny_data, tmp_path):
    asked = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: asked.append(True))
    ncf.main(["--data", tiny_data, "-e", "1", "-b", "512", "--checkpoint_dir", "",
              "--log_path", str(tmp_path / "log.json")])
    assert asked == [True]
