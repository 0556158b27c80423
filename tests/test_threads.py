"""Thread count from the cores ouvert may use, and the busy-machine hint (ouvert/threads.py).

Nothing here changes torch's thread count: configure_threads takes a stand-in for set_num_threads."""

from __future__ import annotations

import io

import pytest
import torch

from ouvert import cli
from ouvert.threads import busy_hint, cgroup_cpu_limit, choose_threads, configure_threads


def test_threads_follow_the_usable_cores_unless_the_user_chose():
    # torch's default counts the machine's cores (32), the process may use 2: run 2.
    assert choose_threads(None, {}, current=32, usable=2) == 2
    # a count within the usable cores is kept (torch's physical-core count, or one the program set)
    assert choose_threads(None, {}, current=4, usable=8) is None
    assert choose_threads(3, {}, current=32, usable=2) == 3  # --threads wins
    assert choose_threads(None, {"OMP_NUM_THREADS": "16"}, current=16, usable=2) is None
    assert choose_threads(None, {"MKL_NUM_THREADS": "16"}, current=16, usable=2) is None
    with pytest.raises(ValueError, match="--threads must be at least 1, not 0"):
        choose_threads(0, {}, current=4, usable=4)


@pytest.mark.parametrize("text,cpus", [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1),
                                       ("max 100000\n", None)])
def test_cgroup_quota(tmp_path, text, cpus):
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_limit(str(tmp_path / "cpu.max")) == cpus
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


def test_busy_hint():
    assert busy_hint(2.5, usable=2, threads=2, env={}) is None  # not clearly above the cores
    hint = busy_hint(9.0, usable=2, threads=2, env={})
    assert hint == ("ouvert: the machine is busy (load average 9.0 on 2 usable core(s)); "
                    "OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning while they wait) "
                    "or fewer threads (--threads N, now 2) may help")
    passive = busy_hint(9.0, usable=2, threads=2, env={"OMP_WAIT_POLICY": "passive"})
    assert "OMP_WAIT_POLICY" not in passive and "--threads N" in passive
    assert busy_hint(9.0, usable=2, threads=1, env={"OMP_WAIT_POLICY": "PASSIVE"}) is None  # nothing left to try


def test_configure_threads_sets_and_warns_once():
    calls, out = [], io.StringIO()
    n = configure_threads(3, env={}, usable=2, load=lambda: 100.0, set_threads=calls.append, out=out)
    assert (n, calls) == (3, [3])
    assert out.getvalue().count("\n") == 1 and "machine is busy" in out.getvalue()
    out = io.StringIO()
    configure_threads(3, warn=False, env={}, usable=2, load=lambda: 100.0, set_threads=calls.append, out=out)
    assert out.getvalue() == ""
    calls.clear()  # no --threads and torch already within the cores: left alone
    assert configure_threads(None, env={}, usable=torch.get_num_threads(), set_threads=calls.append,
                             load=lambda: 0.0) == torch.get_num_threads()
    assert calls == []


def test_cli_passes_threads_on(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(cli, "configure_threads", lambda requested, warn: seen.append((requested, warn)))
    assert cli.main(["info", "--model", str(tmp_path), "--threads", "3"]) == 2  # no checkpoint: fails after
    assert cli.main(["generate", "--model", str(tmp_path), "Hi"]) == 2
    assert seen == [(3, False), (None, True)]
    capsys.readouterr()
