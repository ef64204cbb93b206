import os
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests run on CPU with one thread per process, so parallel processes in a test do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def temp_files_inside_the_pytest_folder(tmp_path_factory):
    """What tests and their subprocesses create through `tempfile` (multiprocessing's pymp-*, torchrun's
    torchelastic_*, wandb's folders, the benchmarks' timecat-*) goes below pytest's temp folder, which a passing
    run removes (tmp_path_retention_policy in pyproject.toml), instead of piling up in /tmp when a test kills a
    process on purpose. Subprocesses (and slurm jobs, which inherit the environment) read TMPDIR."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", folder)
    patch.setattr(tempfile, "tempdir", folder)
    yield folder
    patch.undo()
