import ctypes
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import baselines
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


def raising(error):
    def raise_it(*args, **kwargs):
        raise error
    return raise_it


CPU_OUT_OF_MEMORY = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                 "can't allocate memory: you tried to allocate 8589934592 bytes")


@pytest.mark.parametrize("program, target, argv, expected", [
    (ncf, "run", ["--data", "d"],
     "ncf.py: error: out of memory; lower -b/--batch_size or --valid_batch_size\n"),
    (baselines, "open_logger", ["--data", "d", "--method", "pop"],
     "baselines.py: error: out of memory; for itemknn pass fewer --neighbours, for bpr a "
     "smaller --batch_size\n"),
])
def test_cpu_out_of_memory_is_one_line_and_other_errors_are_not_hidden(
        monkeypatch, capsys, tmp_path, program, target, argv, expected):
    monkeypatch.setattr(program, target, raising(CPU_OUT_OF_MEMORY))
    if program is baselines:
        monkeypatch.setattr(baselines.dataloading, "open_dataset",
                            lambda path: SimpleNamespace(negatives=torch.zeros(1, 100)))
    with pytest.raises(SystemExit) as leaving:
        cli.run(program.main, argv)
    assert leaving.value.code == 2
    assert capsys.readouterr().err == expected
    monkeypatch.setattr(program, target, raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        program.main(argv)
