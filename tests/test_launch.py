"""The ``rankcut`` executable (``rankcut.launch``): when it starts again with the MKL
shim preloaded, that the shim builds and answers, and that results do not change."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankcut import launch
from rankcut.launch import ENV, MARK

LINUX_X86 = sys.platform.startswith("linux") and launch.platform.machine() in ("x86_64", "AMD64")
needs_compiler = pytest.mark.skipif(
    not (LINUX_X86 and launch.compiler()), reason="needs x86-64 Linux and a C compiler"
)


@pytest.mark.parametrize(
    ("argv", "environ", "vendor", "expected"),
    [
        (["compress", "--model", "m"], {}, "AuthenticAMD", True),
        (["-q", "eval", "m"], {}, "AuthenticAMD", True),
        (["finetune", "m"], {}, "AuthenticAMD", True),
        (["train", "--data", "x"], {}, "AuthenticAMD", True),
        (["bench", "m"], {}, "AuthenticAMD", False),  # measures the user's own PyTorch
        (["methods"], {}, "AuthenticAMD", False),
        ([], {}, "AuthenticAMD", False),
        (["compress"], {}, "GenuineIntel", False),  # MKL takes its fast path there
        (["compress"], {ENV: "1"}, "GenuineIntel", True),
        (["compress"], {ENV: "0"}, "AuthenticAMD", False),
        (["compress"], {MARK: "/x.so"}, "AuthenticAMD", False),  # never twice
        (["compress"], {}, None, False),
    ],
)
def test_which_commands_start_again(argv, environ, vendor, expected):
    if not LINUX_X86:
        expected = False
    assert launch.wanted(argv, environ, vendor) is expected


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    assert launch.cpu_vendor(str(info)) == "AuthenticAMD"
    assert launch.cpu_vendor(str(tmp_path / "missing")) is None


def test_relaunch_env_puts_the_shim_first_and_marks_the_process():
    env = launch.relaunch_env(Path("/c/shim.so"), {"LD_PRELOAD": "/other.so", "A": "1"})
    assert env["LD_PRELOAD"] == "/c/shim.so:/other.so"
    assert env[MARK] == "/c/shim.so" and env["A"] == "1"
    assert launch.relaunch_env(Path("/c/shim.so"), {})["LD_PRELOAD"] == "/c/shim.so"


@needs_compiler
def test_shim_builds_once_and_answers_yes(tmp_path, monkeypatch):
    path = launch.shim(tmp_path)
    assert path is not None and path.parent == tmp_path / "mkl"
    assert ctypes.CDLL(str(path)).mkl_serv_intel_cpu_true() == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    monkeypatch.setattr(launch, "compiler", lambda environ=None: None)
    assert launch.shim(tmp_path) == path  # built already: no compiler needed


def test_without_a_compiler_there_is_no_shim_and_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "compiler", lambda environ=None: None)
    assert launch.shim(tmp_path) is None
    calls = []
    monkeypatch.setattr(launch, "wanted", lambda *a: True)
    monkeypatch.setattr(launch, "cache_dir", lambda environ=None: tmp_path)
    monkeypatch.setattr(launch.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(sys, "argv", ["rankcut", "-q", "methods"])
    assert launch.main() == 0
    assert calls == []


@needs_compiler
def test_main_starts_again_with_the_shim_preloaded(tmp_path, monkeypatch):
    calls = []

    def execve(exe, argv, env):
        calls.append((exe, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(launch, "cache_dir", lambda environ=None: tmp_path)
    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.setattr(sys, "argv", ["rankcut", "eval", "m", "--tokens", "8"])
    monkeypatch.setenv(ENV, "1")
    monkeypatch.delenv(MARK, raising=False)
    with pytest.raises(SystemExit):
        launch.main()
    [(exe, argv, env)] = calls
    assert exe == sys.executable
    assert argv == [sys.executable, "-m", "rankcut", "eval", "m", "--tokens", "8"]
    assert env["LD_PRELOAD"].split(":")[0] == env[MARK]
    assert Path(env[MARK]).parent == tmp_path / "mkl"


def _plain_env() -> dict[str, str]:
    """This process's environment without the launcher's settings and any preload."""
    return {k: v for k, v in os.environ.items() if k not in (ENV, MARK, "LD_PRELOAD")}


def _run(args, env_extra, tmp_path):
    env = {**_plain_env(), **env_extra, "RANKCUT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "rankcut", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


PROBE = (  # the product's norm, the preload, and what a global lookup of MKL's question
    # (the lookup MKL's own calls go through) answers: the shim's 1 (libtorch's own is not global)
    "import ctypes, os, torch; g = torch.Generator().manual_seed(0); "
    "a, b = torch.randn(300, 200, generator=g), torch.randn(200, 100, generator=g); "
    "print(repr((a @ b).double().norm().item()), os.environ.get('LD_PRELOAD', ''), "
    "getattr(ctypes.CDLL(None), 'mkl_serv_intel_cpu_true', lambda: 0)(), sep='|')"
)


@needs_compiler
def test_products_and_perplexity_are_the_same_with_the_shim(tmp_path, tiny_llama_dir, eval_file):
    path = launch.shim(tmp_path / "cache")
    env = _plain_env()
    plain = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    shimmed = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**env, "LD_PRELOAD": str(path)},
        capture_output=True,
        text=True,
    )
    (n0, pre0, ans0), (n1, pre1, ans1) = (p.stdout.strip().split("|") for p in (plain, shimmed))
    assert pre0 == "" and pre1 == str(path)
    assert ans1 == "1"  # MKL's question now reaches the shim
    assert abs(float(n1) - float(n0)) <= 1e-5 * float(n0)
    args = ["-q", "eval", str(tiny_llama_dir), "--data", str(eval_file), "--tokens", "256"]
    off = json.loads(_run([*args, "--json"], {ENV: "0"}, tmp_path))
    on = json.loads(_run([*args, "--json"], {ENV: "1"}, tmp_path))
    assert on["perplexity"] == pytest.approx(off["perplexity"], rel=1e-5)


def test_a_refused_exec_runs_the_command_here(tmp_path, monkeypatch):
    def execve(*args):
        raise PermissionError("noexec")

    monkeypatch.setattr(launch, "wanted", lambda *a: True)
    monkeypatch.setattr(launch, "shim", lambda: tmp_path / "x.so")
    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.setattr(sys, "argv", ["rankcut", "-q", "methods"])
    assert launch.main() == 0
