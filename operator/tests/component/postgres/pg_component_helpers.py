"""Helpers of the Postgres component tests (a module of its own: conftest is not importable by name)."""

import threading
import time

import psycopg


class Writer(threading.Thread):
    """Inserts increasing ids through the primary endpoint and records each acknowledged commit."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.acked: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                n += 1
                conn.execute("INSERT INTO writes (id) VALUES (%s)", (n,))
                self.acked.append((n, time.monotonic()))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def acked_after(self, t: float) -> list[int]:
        return [n for n, at in self.acked if at > t]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
