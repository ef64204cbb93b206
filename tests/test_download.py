"""tools/download.py against a local HTTP server (127.0.0.1 only) serving generated archives."""
import errno
import hashlib
import http.server
import io
import os
import random
import re
import socket
import subprocess
import sys
import tarfile
import threading
import types

import pytest

from tools import download
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELEASE_TOP = "ckpt_resnet50_sfadamw_imagenet1k_supervised"
RELEASE = {"full": 5, "200k": 2, "100k": 4, "80k": 5}
README_STEP = {"full": "full", "200k": "200", "100k": "100", "80k": "80"}


# ---- fixtures: archives and a server
def checkpoint_bytes(step, run):
    return random.Random(f"{step}-{run}").randbytes(3000)  # incompressible, so a cut lands mid-file


def add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archive(top=RELEASE_TOP, extra=()):
    """A .tar.gz in the reference release layout; `extra` adds (TarInfo, bytes or None) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for step, n in RELEASE.items():
            for run in range(n):
                add_file(tar, f"{top}/checkpoints_{step}/checkpoint_run{run}.pth", checkpoint_bytes(step, run))
        add_file(tar, f"{top}/README.txt", b"released checkpoints\n")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files with Range support; can fail (status) or cut the connection after N bytes, once."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if srv.fail_times:
            srv.fail_times -= 1
            self.send_error(503)
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body, srv.cut_after = body[:srv.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.fail_times, srv.cut_after = {}, [], 0, None
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_port}{path}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


ARCHIVE = "/ckpt_resnet50_sfadamw_imagenet1k_supervised.tar.gz"


def run(dest, url, *extra):
    args = download.get_args_parser().parse_args(
        ["--url", url, "--dest", str(dest), "--retries", "2", "--backoff", "0", "--timeout", "10", *extra])
    download.main(args)


def placed_files(dest):
    arch = dest / "resnet50_sfadamw"
    return sorted(str(p.relative_to(arch)) for p in arch.rglob("*") if p.is_file()) if arch.exists() else []


def assert_nothing_placed(dest):
    assert placed_files(dest) == []
    assert not [p for p in dest.iterdir() if p.name.startswith(".extract-")] if dest.exists() else True


def assert_all_placed(dest):
    for step, n in RELEASE.items():
        for run_ in range(n):
            path = dest / "resnet50_sfadamw" / f"checkpoints_step{README_STEP[step]}" / f"checkpoint_run{run_}.pth.tar"
            assert path.read_bytes() == checkpoint_bytes(step, run_)
    assert len(placed_files(dest)) == sum(RELEASE.values())


# ---- layout and tags
def test_normalise_layouts():
    n = download.normalise
    assert n(f"{RELEASE_TOP}/checkpoints_full/checkpoint_run0.pth") == \
        "resnet50_sfadamw/checkpoints_stepfull/checkpoint_run0.pth.tar"
    assert n("resnet50_sfadamw_imagenet1k_supervised/checkpoints_200k/checkpoint_run1.pth") == \
        "resnet50_sfadamw/checkpoints_step200/checkpoint_run1.pth.tar"
    assert n("resnet50_sfadamw/checkpoints_step80/checkpoint_run4.pth.tar") == \
        "resnet50_sfadamw/checkpoints_step80/checkpoint_run4.pth.tar"
    assert n("./checkpoints_100k/checkpoint_run3.pth") == "resnet50_sfadamw/checkpoints_step100/checkpoint_run3.pth.tar"
    for other in (f"{RELEASE_TOP}/README.txt", "somewhere/checkpoints_full/checkpoint_run0.pth",
                  "checkpoints_full/model.pth", "checkpoint_run0.pth"):
        assert n(other) is None


def test_builtin_tags_match_the_project_tag_file(tmp_path):
    builtin = download.release_tags(str(tmp_path / "absent.yaml"))
    assert builtin["supervisedimagenet_resnet50_sfadamw_5_step80k"] == [
        f"resnet50_sfadamw/checkpoints_step80/checkpoint_run{i}.pth.tar" for i in range(5)]
    assert len(builtin) == 8
    if os.path.isfile(download.TAG_FILE):
        assert download.release_tags() == builtin


# ---- downloads
def test_full_download_then_idempotent_rerun(server, tmp_path, capsys):
    server.files[ARCHIVE] = make_archive()
    dest = tmp_path / "ckpt"
    run(dest, server.url(ARCHIVE))
    assert_all_placed(dest)
    assert not (dest / ARCHIVE.lstrip("/")).exists() and not list(dest.glob("*.part"))
    assert (dest / "unrecognized_from_archive" / RELEASE_TOP / "README.txt").exists()
    out = capsys.readouterr().out
    assert "Tags complete (8/8)" in out and "README.txt" in out
    assert f"{RELEASE_TOP}/checkpoints_80k/checkpoint_run4.pth -> checkpoints_step80/checkpoint_run4.pth.tar" in out

    n_requests = len(server.requests)
    run(dest, server.url(ARCHIVE))
    assert len(server.requests) == n_requests
    assert "nothing to download" in capsys.readouterr().out


def test_keep_archive_and_readme_layout(server, tmp_path):
    server.files[ARCHIVE] = make_archive(top="resnet50_sfadamw")
    dest = tmp_path / "ckpt"
    run(dest, server.url(ARCHIVE), "--keep-archive", "--sha256", hashlib.sha256(server.files[ARCHIVE]).hexdigest())
    assert_all_placed(dest)
    assert (dest / ARCHIVE.lstrip("/")).read_bytes() == server.files[ARCHIVE]
    # --force places again from the kept archive, without downloading it again
    n_requests = len(server.requests)
    run(dest, server.url(ARCHIVE), "--force")
    assert len(server.requests) == n_requests
    assert_all_placed(dest)


def test_resume_after_cut_within_one_run(server, tmp_path):
    server.files[ARCHIVE] = make_archive()
    server.cut_after = 20000
    dest = tmp_path / "ckpt"
    run(dest, server.url(ARCHIVE))
    assert_all_placed(dest)
    assert server.requests[-1][1] == "bytes=20000-"


def test_resume_after_cut_across_runs(server, tmp_path):
    server.files[ARCHIVE] = make_archive()
    server.cut_after = 20000
    dest = tmp_path / "ckpt"
    with pytest.raises(UserError, match=r"20000 bytes received are kept in .*\.part: run again to resume"):
        run(dest, server.url(ARCHIVE), "--retries", "0")
    assert (dest / (ARCHIVE.lstrip("/") + ".part")).stat().st_size == 20000
    assert_nothing_placed(dest)
    run(dest, server.url(ARCHIVE))
    assert server.requests[-1][1] == "bytes=20000-"
    assert_all_placed(dest)


def test_complete_part_file_is_not_downloaded_again(server, tmp_path):
    server.files[ARCHIVE] = make_archive()
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / (ARCHIVE.lstrip("/") + ".part")).write_bytes(server.files[ARCHIVE])
    run(dest, server.url(ARCHIVE))
    assert server.requests[-1][1] == f"bytes={len(server.files[ARCHIVE])}-"  # answered 416: already complete
    assert_all_placed(dest)


def test_server_errors_are_retried(server, tmp_path):
    server.files[ARCHIVE] = make_archive()
    server.fail_times = 2
    dest = tmp_path / "ckpt"
    run(dest, server.url(ARCHIVE))
    assert len(server.requests) == 3
    assert_all_placed(dest)


def test_checksum_mismatch(server, tmp_path):
    server.files[ARCHIVE] = make_archive()
    dest = tmp_path / "ckpt"
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        run(dest, server.url(ARCHIVE), "--sha256", "0" * 64)
    assert_nothing_placed(dest)
    assert not (dest / ARCHIVE.lstrip("/")).exists()


def test_http_404_is_not_retried(server, tmp_path):
    dest = tmp_path / "ckpt"
    with pytest.raises(UserError, match="HTTP 404"):
        run(dest, server.url("/nothing.tar.gz"))
    assert len(server.requests) == 1
    assert_nothing_placed(dest)


def test_unreachable_url(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    with pytest.raises(UserError, match="cannot reach"):
        run(tmp_path / "ckpt", f"http://127.0.0.1:{port}/x.tar.gz", "--retries", "1")
    with pytest.raises(UserError, match="invalid URL"):
        run(tmp_path / "ckpt", "not-a-url")


@pytest.mark.parametrize("payload", ["garbage", "truncated"])
def test_corrupt_archive(server, tmp_path, payload):
    good = make_archive()
    server.files[ARCHIVE] = os.urandom(5000) if payload == "garbage" else good[:len(good) // 2]
    dest = tmp_path / "ckpt"
    with pytest.raises(UserError, match="corrupt or not a tar archive.*deleted"):
        run(dest, server.url(ARCHIVE))
    assert_nothing_placed(dest)
    assert not (dest / ARCHIVE.lstrip("/")).exists()


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    data = None
    if kind == tarfile.REGTYPE:
        data = b"evil"
        info.size = len(data)
    return info, data


@pytest.mark.parametrize("member,why", [
    (_member("../evil.txt"), "'..'"),
    (_member(f"{RELEASE_TOP}/../../evil.txt"), "'..'"),
    (_member("/tmp/evil.txt"), "absolute path"),
    (_member(f"{RELEASE_TOP}/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (_member(f"{RELEASE_TOP}/hard", tarfile.LNKTYPE, f"{RELEASE_TOP}/README.txt"), "is a link"),
    (_member(f"{RELEASE_TOP}/dev", tarfile.CHRTYPE), "device"),
])
def test_malicious_member(server, tmp_path, member, why):
    server.files[ARCHIVE] = make_archive(extra=[member])
    dest = tmp_path / "sub" / "ckpt"
    with pytest.raises(UserError, match=f"refusing to extract .*{re.escape(why)}.*nothing was placed"):
        run(dest, server.url(ARCHIVE))
    assert_nothing_placed(dest)
    assert not (tmp_path / "sub" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_archive_without_checkpoints_is_kept(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add_file(tar, "photos/cat.jpg", b"meow")
    server.files[ARCHIVE] = buf.getvalue()
    dest = tmp_path / "ckpt"
    with pytest.raises(UserError, match="no checkpoint in a known layout.*photos/cat.jpg"):
        run(dest, server.url(ARCHIVE))
    assert_nothing_placed(dest)
    assert (dest / ARCHIVE.lstrip("/")).exists()


def test_disk_full_keeps_the_part_file(server, tmp_path, monkeypatch):
    server.files[ARCHIVE] = make_archive()
    dest = tmp_path / "ckpt"

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 10000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = open
    monkeypatch.setattr(download, "open", lambda path, mode="r": FullDisk(real_open(path, mode))
                        if path.endswith(".part") else real_open(path, mode), raising=False)
    monkeypatch.setattr(download, "CHUNK", 4096)
    with pytest.raises(UserError, match="disk full while writing .*part.*resume"):
        run(dest, server.url(ARCHIVE))
    part = dest / (ARCHIVE.lstrip("/") + ".part")
    assert 0 < part.stat().st_size <= 10000
    assert_nothing_placed(dest)
    monkeypatch.undo()
    run(dest, server.url(ARCHIVE))
    assert_all_placed(dest)


def test_not_enough_space_is_said_before_downloading(server, tmp_path, monkeypatch):
    server.files[ARCHIVE] = make_archive()
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10))
    with pytest.raises(UserError, match="not enough disk space"):
        run(tmp_path / "ckpt", server.url(ARCHIVE))


def test_cli_error_is_one_line(server, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "download.py"), "--url",
                           server.url("/missing.tar.gz"), "--dest", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: HTTP 404") and len(proc.stderr.strip().splitlines()) == 1


def test_shell_wrapper_passes_arguments(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "download.sh"), "--help"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0 and "--keep_archive" in proc.stdout
