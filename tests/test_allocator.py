"""The command line's malloc settings (``rankcut.cli.allocator``)."""

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
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1) or True)
    assert cli.main(["-q", "methods"]) == 0
    assert calls == [1]
