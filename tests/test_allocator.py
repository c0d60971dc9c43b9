"""The command line's malloc settings (``rankcut.cli.allocator``)."""

import os
import subprocess
import sys

import pytest
import torch

from rankcut.cli.allocator import ENV, tune_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_allocator_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert tune_allocator() is False
    monkeypatch.delenv(ENV)
    assert tune_allocator() is True  # every mallopt call accepted its value
    # allocations above and below the mmap threshold still work after it
    for n in (1 << 10, 1 << 22, 1 << 24):
        x = torch.ones(n)
        assert float(x.sum()) == n
        del x


def test_cli_applies_the_tuning(monkeypatch):
    import rankcut.cli as cli

    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda huge_pages: calls.append(huge_pages))
    assert cli.main(["-q", "methods"]) == 0
    assert calls == [False]  # huge pages only for the commands that grow to gigabytes
    parser = cli.build_parser()
    assert parser.parse_args(["compress", "--model", "m", "--ratio", "0.2"]).huge_pages


def _fresh_process(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", ENV)}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "none"


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages")
def test_tuning_backs_large_tensors_with_huge_pages_in_a_fresh_process():
    """PyTorch reads its switch once: the tuning sets it early enough in a new process
    (as the command line runs it), and not at all when turned off."""
    code = (
        "import os, torch; from rankcut.cli.allocator import tune_allocator; t = tune_allocator(huge_pages=True); "
        "x = torch.ones(1 << 25); "  # 128 MB, touched
        "huge = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]; "
        "print(t, int(huge[0].split()[1]) > 0, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    assert _fresh_process(code) == "True True 1"
    off = _fresh_process(code, **{ENV: "0"})
    assert off.startswith("False") and off.endswith("None")
    if _thp_mode() == "madvise":  # nothing asked for them
        assert off == "False False None"
