"""What a snapshot, restore or forget pod runs: restic against a Volume's repository.

    python -m kubefly.volumes.resticjob backup  DIR --host-id ID --tag TAG [--freeze-pod UID --cgroup-root DIR]
    python -m kubefly.volumes.resticjob restore DIR --snapshot ID
    python -m kubefly.volumes.resticjob forget  --snapshot ID

The repository, its key and the store's credentials come from the environment
(RESTIC_REPOSITORY, RESTIC_PASSWORD, AWS_*), as restic reads them. The result
is one JSON object written to the container's termination message, which the
operator reads from the pod's status (no API access from here).

A backup of a running Machine is taken in two passes: the first while it runs
(the bulk of the bytes), the second with the Machine's pod cgroup frozen, so
the copy is of one instant of the whole directory, as a crash would leave it
(restic re-reads only files whose size, time or inode changed, so the freeze
lasts as long as the delta takes). A second pass that would hold the freeze
past FREEZE_LIMIT_S is stopped, the pod thawed, and the live first pass kept
and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

FREEZE_LIMIT_S = 30.0
FROZEN_WAIT_S = 5.0
TERMINATION_LOG = "/dev/termination-log"
# The message the kubelet keeps is at most 4096 bytes; a restic error can be longer.
MESSAGE_LIMIT = 3000


class JobError(Exception):
    pass


def _restic(*args: str, cwd: str | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["restic", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tail(text: str) -> str:
    return text.strip()[-MESSAGE_LIMIT:]


def ensure_repository() -> None:
    """Initialise the repository unless it exists (a concurrent init by another pod counts as existing)."""
    if _restic("cat", "config").returncode == 0:
        return
    made = _restic("init")
    if made.returncode != 0 and _restic("cat", "config").returncode != 0:
        raise JobError(f"cannot open or create the repository: {_tail(made.stderr)}")


def _summary(proc: subprocess.CompletedProcess, partial_ok: bool = False) -> dict:
    # restic exits 3 when some files could not be read: the copy would be silently partial. Only the
    # live pass before a frozen one may be (a running Machine's files come and go as it is read).
    if proc.returncode != 0 and not (partial_ok and proc.returncode == 3):
        raise JobError(f"restic backup failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    for line in reversed(proc.stdout.splitlines()):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("message_type") == "summary":
            return {**msg, "kubefly_partial": proc.returncode == 3}
    raise JobError("restic backup printed no summary")


def _backup(directory: str, host_id: str, tag: str, parent: str | None = None, timeout: float | None = None,
            partial_ok: bool = False) -> dict:
    args = ["backup", "--json", "--host", host_id, "--tag", tag]
    if parent:
        args += ["--parent", parent]
    # The directory itself, named from its parent: the copy keeps the volume's own owner and mode,
    # and an empty volume is still a copy (restic refuses a snapshot of nothing, as "." would be).
    top = Path(directory).resolve()
    return _summary(_restic(*args, top.name, cwd=str(top.parent), timeout=timeout), partial_ok)


# ---- the freezer --------------------------------------------------------------


class Freezer:
    """One pod's cgroup frozen and thawed, cgroup v2 (cgroup.freeze) or v1 (freezer.state)."""

    def __init__(self, path: Path, v2: bool):
        self.path, self.v2 = path, v2

    @classmethod
    def find(cls, cgroup_root: str, pod_uid: str) -> "Freezer | None":
        """The pod's own cgroup below the host's cgroup root, named after its uid by either cgroup driver."""
        root = Path(cgroup_root)
        v2 = (root / "cgroup.controllers").exists()
        base = root if v2 else root / "freezer"
        names = (f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}")
        for top, dirs, _ in os.walk(base):
            for d in dirs:
                if any(d == n or d.endswith(f"-{n}.slice") for n in names):
                    return cls(Path(top) / d, v2)
            if len(Path(top).relative_to(base).parts) >= 5:
                dirs[:] = []  # pods sit a few levels down; never walk the whole tree
        return None

    def _write(self, frozen: bool) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def _is_frozen(self) -> bool:
        if self.v2:
            return "frozen 1" in (self.path / "cgroup.events").read_text()
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def freeze(self) -> None:
        self._write(True)
        deadline = time.monotonic() + FROZEN_WAIT_S
        while not self._is_frozen():
            if time.monotonic() > deadline:
                self.thaw()
                raise JobError(f"the machine's cgroup {self.path} did not freeze within {FROZEN_WAIT_S:.0f} s")
            time.sleep(0.02)

    def thaw(self) -> None:
        self._write(False)


def backup(directory: str, host_id: str, tag: str, freeze_pod: str | None, cgroup_root: str | None) -> dict:
    ensure_repository()
    started = time.monotonic()
    freezer = Freezer.find(cgroup_root, freeze_pod) if freeze_pod and cgroup_root else None
    first = _backup(directory, host_id, tag, partial_ok=freezer is not None)
    result = {"consistency": "stopped" if not freeze_pod else "live", "frozenSeconds": 0.0}
    final = first
    if freezer is not None:
        thaw_on_term = signal.signal(signal.SIGTERM, lambda *_: (freezer.thaw(), sys.exit(143)))
        freezer.freeze()
        frozen_at = time.monotonic()
        try:
            final = _backup(directory, host_id, tag, parent=first["snapshot_id"], timeout=FREEZE_LIMIT_S)
            result["consistency"] = "crash-consistent"
        except subprocess.TimeoutExpired:
            if first.get("kubefly_partial"):
                raise JobError(f"the frozen pass took over {FREEZE_LIMIT_S:.0f} s and the live pass missed files "
                               "that changed while it read them: no complete copy") from None
            result["note"] = f"the frozen pass took over {FREEZE_LIMIT_S:.0f} s: kept the live pass"
        finally:
            freezer.thaw()
            signal.signal(signal.SIGTERM, thaw_on_term)
            result["frozenSeconds"] = round(time.monotonic() - frozen_at, 3)
        if final is not first:
            # The live pass was only the bulk transfer; its blobs stay, referenced by the final copy.
            _restic("forget", first["snapshot_id"])
    elif freeze_pod:
        result["note"] = "the machine's cgroup was not found on this host: read while running"
    result.update({
        "snapshotId": final["snapshot_id"],
        "bytes": final.get("total_bytes_processed", 0),
        "addedBytes": first.get("data_added", 0) + (final.get("data_added", 0) if final is not first else 0),
        "files": final.get("total_files_processed", 0),
        "seconds": round(time.monotonic() - started, 3),
    })
    return result


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def restore(directory: str, snapshot: str) -> dict:
    """Fill `directory` (a new Volume's, which nothing mounts yet) with the copy: its contents, owner and mode."""
    started = time.monotonic()
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    # A retried restore starts again from nothing: the directory is the new Volume's own.
    _empty(target)
    staging = target / ".kubefly-restore"
    proc = _restic("restore", snapshot, "--target", str(staging))
    if proc.returncode != 0:
        raise JobError(f"restic restore failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    tops = list(staging.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise JobError(f"copy {snapshot} holds {sorted(t.name for t in tops)}, not one volume directory")
    top = tops[0]
    for child in top.iterdir():
        os.replace(child, target / child.name)
    meta = top.stat()
    os.chown(target, meta.st_uid, meta.st_gid)
    os.chmod(target, stat.S_IMODE(meta.st_mode))
    top.rmdir()
    staging.rmdir()
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file() and not f.is_symlink())
    return {"snapshotId": snapshot, "bytes": size, "seconds": round(time.monotonic() - started, 3)}


def forget(snapshot: str) -> dict:
    started = time.monotonic()
    proc = _restic("forget", "--prune", snapshot)
    if proc.returncode != 0 and "no matching ID" not in proc.stderr:
        raise JobError(f"restic forget failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    return {"snapshotId": snapshot, "seconds": round(time.monotonic() - started, 3)}


def _report(result: dict, path: str) -> None:
    line = json.dumps(result, separators=(",", ":"))
    print(line, flush=True)
    try:
        Path(path).write_text(line)
    except OSError:
        pass  # run outside a pod: stdout is the report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubefly.volumes.resticjob")
    sub = parser.add_subparsers(dest="job", required=True)
    b = sub.add_parser("backup")
    b.add_argument("directory")
    b.add_argument("--host-id", required=True)
    b.add_argument("--tag", required=True)
    b.add_argument("--freeze-pod")
    b.add_argument("--cgroup-root")
    r = sub.add_parser("restore")
    r.add_argument("directory")
    r.add_argument("--snapshot", required=True)
    f = sub.add_parser("forget")
    f.add_argument("--snapshot", required=True)
    parser.add_argument("--report", default=TERMINATION_LOG)
    args = parser.parse_args(argv)
    try:
        if args.job == "backup":
            result = backup(args.directory, args.host_id, args.tag, args.freeze_pod, args.cgroup_root)
        elif args.job == "restore":
            result = restore(args.directory, args.snapshot)
        else:
            result = forget(args.snapshot)
    except (JobError, subprocess.TimeoutExpired) as exc:
        _report({"error": str(exc)}, args.report)
        return 1
    _report(result, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
