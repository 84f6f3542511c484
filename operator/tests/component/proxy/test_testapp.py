"""The test app as a process: a stop signal ends it at once and it says which one."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from kubefly.ports import free_port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_ends_the_app_and_is_named_on_stdout(sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kubefly.proxy.testapp", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == f"testapp: received {sig.name}, exiting"
