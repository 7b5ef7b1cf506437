"""The stop-signal handler in a real process: flag, repeated signals, forced exit of a hung stop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from vdep.errors import EXIT_PREEMPTED


def run_script(body: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import os, signal, time, torch
        from vdep.train.preemption import StopRequest
        cpu = torch.device("cpu")
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=timeout_s)


def test_signals_set_a_flag_and_repeats_are_reported_not_obeyed():
    result = run_script("""
        with StopRequest(forced_exit_after_s=60) as stop:
            assert not stop.agreed(cpu)
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # would kill the process with the default handler
            time.sleep(0.1)
            assert stop.signal_name == "SIGUSR1" and stop.agreed(cpu)
        os.kill(os.getpid(), signal.SIGTERM)  # after a stop, still ignored on the way out
        time.sleep(0.1)
        print("survived")
    """)
    assert result.returncode == 0, result.stderr
    assert "survived" in result.stdout
    assert "SIGUSR1 received; stopping after the current step" in result.stderr
    assert "SIGTERM received while stopping" in result.stderr


def test_without_a_signal_the_previous_handlers_come_back():
    result = run_script("""
        with StopRequest(forced_exit_after_s=60) as stop:
            assert not stop.agreed(cpu)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    """)
    assert result.returncode == -15


def test_a_stop_that_hangs_is_ended_by_the_timer_with_the_requeue_status():
    start = time.monotonic()
    result = run_script("""
        with StopRequest(forced_exit_after_s=1) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(30)  # a collective that never returns
    """)
    assert result.returncode == EXIT_PREEMPTED
    assert time.monotonic() - start < 20
    assert "did not finish within 1 s" in result.stderr
