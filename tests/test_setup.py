"""setup.sh on a machine whose system Python is "externally managed" (PEP 668) and has no uv: it bootstraps uv
into the project's .uv/ and never installs into the system Python. Every external program is a fake that records
its arguments (no network)."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON3 = r'''#!/usr/bin/env bash
echo "python3 $*" >> "$LOG"
if [[ "$1 $2" == "-m pip" ]]; then echo "error: externally-managed-environment" >&2; exit 1; fi
if [[ "$1 $2" == "-m uv" ]]; then echo "No module named uv" >&2; exit 1; fi
if [[ "$1 $2" == "-m venv" ]]; then  # a venv whose pip installs the fake uv below
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\necho "venv-python $*" >> "$LOG"\ncp "$FAKE_UV" "$(dirname "$0")/uv"\n' > "$3/bin/python"
  chmod +x "$3/bin/python"; exit 0
fi
exit 1
'''
FAKE_UV = r'''#!/usr/bin/env bash
echo "uv $*" >> "$LOG"
if [[ $1 == sync ]]; then
  mkdir -p .venv/bin
  printf '#!/usr/bin/env bash\necho "setup: fake torch"\n' > .venv/bin/python; chmod +x .venv/bin/python
fi
'''


def test_setup_bootstraps_uv_without_touching_an_externally_managed_python(tmp_path):
    project, fakes, log = tmp_path / "project", tmp_path / "bin", tmp_path / "calls.log"
    project.mkdir()
    fakes.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.sh"), project / "setup.sh")
    for name, text in (("python3", FAKE_PYTHON3), ("uv.src", FAKE_UV)):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fakes}:/usr/bin:/bin", LOG=str(log), FAKE_UV=str(fakes / "uv.src"))
    env.pop("CUDA", None)
    done = subprocess.run(["bash", "setup.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("python3 -m pip")]  # the system Python is never installed into
    assert "python3 -m venv .uv" in calls and "venv-python -m pip install --quiet uv" in calls
    sync = next(c for c in calls if c.startswith("uv sync"))
    assert "--locked" in sync and "--compile-bytecode" in sync  # the lock, with bytecode compiled
    assert (project / ".uv" / "bin" / "uv").exists()
    # a second run reuses the bootstrapped uv
    log.unlink()
    assert subprocess.run(["bash", "setup.sh"], cwd=project, env=env, capture_output=True, timeout=60).returncode == 0
    assert not [c for c in log.read_text().splitlines() if c.startswith(("python3 -m venv", "venv-python"))]


def test_python_version_is_pinned_and_the_lock_resolves_for_it_and_for_existing_environments():
    """.python-version is the environment setup.sh locks and tests; requires-python is wider so that
    `pip install -e .` works in a user's existing environment (the lock then holds one fork per torch line)."""
    with open(os.path.join(ROOT, ".python-version")) as f:
        version = f.read().strip()
    with open(os.path.join(ROOT, "uv.lock")) as f:
        lock = f.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert lock.count("requires-python") == 1 and 'requires-python = ">=3.10"' in lock
    assert 'requires-python = ">=3.10"' in pyproject and version == "3.11"
    assert "python_full_version >= '3.11'" in lock  # the pinned version's own resolution (torch 2.15)
