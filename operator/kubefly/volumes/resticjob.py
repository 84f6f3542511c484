"""What a snapshot, restore or forget pod runs: restic against a Volume's repository.

    python -m kubefly.volumes.resticjob backup  DIR --host-id ID --tag TAG [--freeze-pod UID --cgroup-root DIR]
    python -m kubefly.volumes.resticjob restore DIR (--snapshot ID | --wait-for-tag TAG) [--since ID]
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

A restore `--since` an older copy already in the directory (a migration's
second pass) brings only what changed between the two: `restic diff` names
the paths, removed ones are deleted, changed ones restored by name. restic
0.14 cannot skip unchanged files in a whole restore, and reading a 1 GiB copy
again is what the machine's downtime would wait on. For the same reason that
pod can start before its copy exists (`--wait-for-tag`): it waits for the
copy to appear in the repository, so its start is not part of the downtime.
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
from datetime import datetime
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


NO_REPOSITORY = "unable to open config file"


def ensure_repository() -> None:
    """Initialise the repository unless it exists (a concurrent init by another pod counts as existing)."""
    if _restic("cat", "config").returncode == 0:
        return
    made = _restic("init")
    if made.returncode != 0 and _restic("cat", "config").returncode != 0:
        raise JobError(f"cannot open or create the repository: {_tail(made.stderr)}")


def _first_backup(directory: str, host_id: str, tag: str, partial_ok: bool) -> dict:
    """The first pass, made in the repository there is; only a repository that is not there yet is made
    first (a Volume's first copy): one restic start fewer for every copy after it."""
    try:
        return _backup(directory, host_id, tag, partial_ok=partial_ok)
    except JobError as exc:
        if NO_REPOSITORY not in str(exc):
            raise
    ensure_repository()
    return _backup(directory, host_id, tag, partial_ok=partial_ok)


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
    started = time.monotonic()
    freezer = Freezer.find(cgroup_root, freeze_pod) if freeze_pod and cgroup_root else None
    first = _first_backup(directory, host_id, tag, partial_ok=freezer is not None)
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


# Past this many changed paths one restore of everything is quicker than naming them (and argv stays bounded).
DELTA_PATH_LIMIT = 2000


def _changes(since: str, snapshot: str) -> list[tuple[str, str, bool]]:
    """(modifier, path below the volume directory, is a directory) for each entry that differs;
    path '' is the volume directory itself."""
    proc = _restic("diff", "--json", "--metadata", since, snapshot)
    if proc.returncode != 0:
        raise JobError(f"restic diff failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    out = []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("message_type") != "change":
            continue
        # Paths are /<volume directory>/...: the copy is of the directory by its name. Directories end in /.
        raw = msg["path"]
        parts = raw.strip("/").split("/", 1)
        out.append((msg["modifier"], parts[1] if len(parts) > 1 else "", raw.endswith("/")))
    return out


def _directories(snapshot: str) -> dict[str, dict]:
    """The copy's directories (path below the volume directory -> restic's node): their owners, modes and times."""
    proc = _restic("ls", "--json", snapshot)
    if proc.returncode != 0:
        raise JobError(f"restic ls failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    found = {}
    for line in proc.stdout.splitlines():
        try:
            node = json.loads(line)
        except ValueError:
            continue
        if node.get("struct_type") == "node" and node.get("type") == "dir":
            parts = node["path"].strip("/").split("/", 1)
            found[parts[1] if len(parts) > 1 else ""] = node
    return found


# Go's os.FileMode keeps setuid, setgid and sticky apart from the permission bits.
_GO_SPECIAL = ((1 << 23, stat.S_ISUID), (1 << 22, stat.S_ISGID), (1 << 20, stat.S_ISVTX))


def _mode(go_mode: int) -> int:
    return (go_mode & 0o777) | sum(bit for go, bit in _GO_SPECIAL if go_mode & go)


def _mtime_ns(text: str) -> int:
    """restic's RFC 3339 time with nanoseconds, as integer nanoseconds since the epoch."""
    head, _, rest = text.partition(".")
    digits = "".join(c for c in rest if c.isdigit()) if rest else ""
    zone = rest[len(digits):] if rest else head[19:]
    whole = datetime.fromisoformat(head[:19] + (zone.replace("Z", "+00:00") or "+00:00"))
    return int(whole.timestamp()) * 1_000_000_000 + int((digits + "000000000")[:9])


def _set_directory(path: Path, node: dict) -> None:
    os.chown(path, int(node.get("uid", 0)), int(node.get("gid", 0)))
    os.chmod(path, _mode(int(node.get("mode", 0o755))))
    mtime = _mtime_ns(node["mtime"]) if node.get("mtime") else None
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pattern(top: str, rel: str) -> str:
    """An include naming exactly one path (restic's patterns are globs)."""
    escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in rel)
    return f"/{top}/{escaped}"


def restore_delta(directory: str, snapshot: str, since: str) -> dict:
    """Bring `directory`, holding copy `since`, to copy `snapshot`: only what changed in between.

    Changed files are restored by name into a staging directory and moved into place; a directory
    is never restored as a whole (that would read its unchanged files too): new ones are made, and
    every changed one takes its owner, mode and time from the copy, after its entries are in."""
    started = time.monotonic()
    target = Path(directory)
    changes = _changes(since, snapshot)
    files = sorted({rel for mod, rel, is_dir in changes if not is_dir and rel and mod != "-"})
    if len(files) > DELTA_PATH_LIMIT:
        result = restore(directory, snapshot)
        return {**result, "delta": False, "changedPaths": len(changes), "seconds": round(time.monotonic() - started, 3)}
    # Deepest first, so a removed directory's entries go before it does.
    for rel in sorted((rel for mod, rel, _ in changes if mod == "-" and rel), key=lambda r: -r.count("/")):
        _remove(target / rel)
    # A file that became a directory: restic lists the directory alone, so it comes back whole.
    # Modifiers combine ("TU": type and metadata).
    whole = sorted(rel for mod, rel, is_dir in changes if is_dir and "T" in mod and rel)
    dirs = sorted({rel for mod, rel, is_dir in changes if is_dir and mod != "-" and "T" not in mod},
                  key=lambda r: (r.count("/"), r))
    for rel in dirs:
        dest = target / rel
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            _remove(dest)  # a file that became a directory
        dest.mkdir(parents=True, exist_ok=True)
    staging = target / ".kubefly-restore"
    _remove(staging)
    if files or whole:
        top = target.resolve().name
        includes = [arg for rel in files + whole for arg in ("--include", _pattern(top, rel))]
        proc = _restic("restore", snapshot, "--target", str(staging), *includes)
        if proc.returncode != 0:
            raise JobError(f"restic restore failed (exit {proc.returncode}): {_tail(proc.stderr)}")
        for rel in files:
            source, dest = staging / top / rel, target / rel
            if dest.is_dir() and not dest.is_symlink():
                _remove(dest)  # a directory that became a file
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
        for rel in whole:
            _remove(target / rel)
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / top / rel, target / rel)
        _remove(staging)
    if dirs or whole:
        nodes = _directories(snapshot)
        for rel in sorted(dirs + whole, key=lambda r: -r.count("/")):
            if rel in nodes:
                _set_directory(target / rel if rel else target, nodes[rel])
    return {"snapshotId": snapshot, "since": since, "delta": True, "changedPaths": len(changes), "files": len(files),
            "seconds": round(time.monotonic() - started, 3)}


WAIT_POLL_S = 0.25


def wait_for_tag(tag: str, timeout: float) -> str:
    """The id of the copy tagged `tag`, once another pod has made it (read without a lock, as often as cheap)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = _restic("--no-lock", "snapshots", "--json", "--tag", tag)
        if proc.returncode == 0:
            found = json.loads(proc.stdout or "[]")
            if found:
                return max(found, key=lambda s: s.get("time", ""))["id"]
        if time.monotonic() > deadline:
            raise JobError(f"no copy tagged {tag} appeared within {timeout:.0f} s")
        time.sleep(WAIT_POLL_S)


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
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--snapshot")
    which.add_argument("--wait-for-tag", help="restore the copy with this tag, waiting for it to be made")
    r.add_argument("--wait-timeout", type=float, default=600.0)
    r.add_argument("--since", help="the copy already in DIR: restore only what changed since it")
    f = sub.add_parser("forget")
    f.add_argument("--snapshot", required=True)
    parser.add_argument("--report", default=TERMINATION_LOG)
    args = parser.parse_args(argv)
    try:
        if args.job == "backup":
            result = backup(args.directory, args.host_id, args.tag, args.freeze_pod, args.cgroup_root)
        elif args.job == "restore":
            snapshot = args.snapshot or wait_for_tag(args.wait_for_tag, args.wait_timeout)
            result = restore_delta(args.directory, snapshot, args.since) if args.since else restore(args.directory, snapshot)
        else:
            result = forget(args.snapshot)
    except (JobError, subprocess.TimeoutExpired) as exc:
        _report({"error": str(exc)}, args.report)
        return 1
    _report(result, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
