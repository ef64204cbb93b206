"""Tools leave the repository as they found it (`git status` clean after their default runs), and downloads are
checked (iNat's published MD5, the checkpoint archive's SHA-256 printed, a warning for full unpickling)."""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from tools import benchmark, download, prepare_data
from util.checkpoint import load_file
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(cwd, *argv):
    return subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree as a fresh clone would have it (tracked and new files, nothing ignored), committed."""
    clone = tmp_path_factory.mktemp("clone")
    for rel in git(ROOT, "ls-files", "-co", "--exclude-standard").splitlines():
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(clone / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), clone / rel)
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    return clone


@pytest.mark.parametrize("argv", [
    ["tools/plan_timecat.py"],
    ["tools/submit.py", "lineareval", "--sweep", "cifar", "--dry_run"],
    ["tools/summarize.py"],
    ["tools/prepare_data.py", "check"],
])
def test_a_tools_default_run_leaves_git_status_clean(clone, argv):
    env = {k: v for k, v in os.environ.items() if k != "CAT_EXP_HOME"}
    done = subprocess.run([sys.executable, *argv], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    assert git(clone, "status", "--porcelain") == ""


def test_benchmark_records_under_results_unless_told(clone):
    default = benchmark.get_args_parser().parse_args(["probe"]).results
    assert os.path.relpath(default, ROOT) == os.path.join("results", "benchmarks.md")
    assert git(clone, "check-ignore", os.path.relpath(default, ROOT)).strip()  # ignored: git status stays clean
    published = benchmark.get_args_parser().parse_args(["probe", "--record", "docs/benchmarks.md"]).results
    assert published == "docs/benchmarks.md"


# ---- integrity
def test_inat_download_is_checked_against_the_published_md5(tmp_path, monkeypatch):
    archive = tmp_path / "train_val2018.tar.gz"
    monkeypatch.setattr(prepare_data, "fetch", lambda url, path, *a, **k: open(path, "wb").write(b"corrupt"))
    monkeypatch.setattr(prepare_data, "INAT_MD5", {archive.name: hashlib.md5(b"original").hexdigest()})
    for done in ("train2018.json", "val2018.json"):  # the annotations are in place: the image archive comes next
        os.makedirs(tmp_path / "d" / "inaturalist18", exist_ok=True)
        (tmp_path / "d" / "inaturalist18" / done).write_text("{}")
    args = prepare_data.get_args_parser().parse_args(["inat", "--download", "--data_path", str(tmp_path / "d"),
                                                      "--archive_dir", str(tmp_path)])
    with pytest.raises(UserError, match="MD5 mismatch for .*train_val2018.tar.gz: expected"):
        prepare_data.prepare_inat(args)
    assert not archive.exists()  # deleted: the next run downloads it afresh
    assert prepare_data.INAT_MD5 != {} and "train_val2018.tar.gz" in prepare_data.INAT_MD5


def test_published_inat_md5_is_torchvisions():
    assert prepare_data.INAT_MD5["train_val2018.tar.gz"] == "b1c6952ce38f31868cc50ea72d066cc3"


def test_download_prints_the_sha256_to_pin(tmp_path, capsys):
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("release/README.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    args = download.get_args_parser().parse_args(["--archive", str(archive), "--dest", str(tmp_path / "ckpt")])
    try:
        download.main(args)
    except UserError:
        pass  # an archive without checkpoints is refused after the digest is printed
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in capsys.readouterr().out


def test_full_unpickling_warns_with_the_file_name(tmp_path, capsys):
    plain, pickled = tmp_path / "plain.pth", tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    torch.save({"w": torch.zeros(1), "note": io.StringIO("python object")}, pickled)
    load_file(str(plain))
    assert "warning" not in capsys.readouterr().out
    load_file(str(pickled))
    out = capsys.readouterr().out
    assert out.startswith("warning: ") and str(pickled) in out and "weights_only=False" in out
