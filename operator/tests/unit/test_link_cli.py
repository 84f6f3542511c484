"""`make up` leaves `kubefly` on the PATH the quick start sets (hack/link-cli.sh)."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_kubefly_runs_from_the_tools_directory_alone(tmp_path):
    env = {**os.environ, "KUBEFLY_CACHE": str(tmp_path / "cache")}
    linked = subprocess.run(["bash", str(REPO / "hack/link-cli.sh")], env=env, capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr
    tools = Path(linked.stdout.strip())
    assert tools == tmp_path / "cache" / "bin"
    # Only the tools directory and the system's: no .venv on PATH, as in a user's new shell.
    shell = {**env, "PATH": f"{tools}:/usr/bin:/bin"}
    out = subprocess.run(["kubefly", "secrets", "seal", "--help"], env=shell, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--namespace" in out.stdout
    # Linking again (a second `make up`) replaces the link instead of failing.
    again = subprocess.run(["bash", str(REPO / "hack/link-cli.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr

