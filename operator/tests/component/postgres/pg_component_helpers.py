"""Helpers of the Postgres component tests (a module of its own: conftest is not importable by name)."""

import threading
import time

import psycopg


class Writer(threading.Thread):
    """Inserts increasing ids through the primary endpoint and records each acknowledged commit.

    `in_flight_s()` is how long the current attempt (connect or commit) has been
    running: a commit that waits on a standby that is gone shows there, where
    the client would simply hang.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.acked: list[tuple[int, float]] = []
        self.errors: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self._attempt_started: float | None = None
        self.longest_attempt_s = 0.0

    def run(self) -> None:
        n = 0
        conn = None
        while not self.stop.is_set():
            self._attempt_started = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                n += 1
                conn.execute("INSERT INTO writes (id) VALUES (%s)", (n,))
                self.acked.append((n, time.monotonic()))
            except psycopg.Error as exc:
                self.errors.append((time.monotonic(), str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            finally:
                self.longest_attempt_s = max(self.longest_attempt_s, time.monotonic() - self._attempt_started)
                self._attempt_started = None
        if conn is not None:
            conn.close()

    def in_flight_s(self) -> float:
        started = self._attempt_started
        return 0.0 if started is None else time.monotonic() - started

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
