"""tools/prepare_data.py on generated dataset folders (no network beyond 127.0.0.1)."""
import functools
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from tools import prepare_data
from util.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WNIDS = ["n01440764", "n01443537", "n01484850"]


def run(*argv):
    return prepare_data.main(prepare_data.get_args_parser().parse_args(list(argv)))


# ---- generators
def make_cifar_files(data, name, skip=()):
    sub, files = prepare_data.CIFAR_FILES[name]
    folder = data / "cifar" / sub
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f not in skip:
            (folder / f).write_bytes(b"x")


def inat_tree(root, n_per_split=3):
    """train_val2018/<kingdom>/<id>/<hash>.jpg images and the two COCO-style JSON files under root."""
    for split, offset in (("train", 0), ("val", 100)):
        images, annotations = [], []
        for i in range(n_per_split):
            cat = i % 2
            name = f"train_val2018/Plantae/{7477 + cat}/{split}{i:04d}abcdef.jpg"
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"jpeg")
            images.append({"id": offset + i, "file_name": name, "width": 8, "height": 8})
            annotations.append({"id": offset + i, "image_id": offset + i, "category_id": cat})
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
        (root / f"{split}2018.json").write_text(json.dumps(coco))


def make_inat_archives(tmp_path, out_dir):
    """The three iNaturalist 2018 archives, built from a generated tree, written into out_dir."""
    src = tmp_path / "inat_src"
    inat_tree(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    for archive, target in prepare_data.INAT_ARCHIVES.items():
        with tarfile.open(out_dir / archive, "w:gz") as tar:
            tar.add(src / target, arcname=target)


def make_imagenet(data, flat_val=False, n_per_class=2):
    root = data / "imagenet"
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(n_per_class):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(b"jpeg")
    (root / "val").mkdir(parents=True)
    truth = {}
    for i in range(1, len(WNIDS) * n_per_class + 1):
        name, wnid = f"ILSVRC2012_val_{i:08d}.JPEG", WNIDS[(i * 7) % len(WNIDS)]
        truth[name] = wnid
        folder = root / "val" if flat_val else root / "val" / wnid
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"jpeg")
    return truth


# ---- check
def test_check_on_empty_folder_says_how_to_get_everything(tmp_path, capsys):
    assert run("check", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    for name in prepare_data.DATASETS:
        assert f"{name}: NOT READY" in out
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in out
    for archive in prepare_data.INAT_ARCHIVES:
        assert f"{prepare_data.INAT_URL}/{archive}" in out
    assert "ImageNet needs your own download" in out


def test_check_cifar_complete_and_missing_pieces(tmp_path, capsys):
    make_cifar_files(tmp_path, "cifar10")
    make_cifar_files(tmp_path, "cifar100", skip=("meta",))
    assert run("check", "cifar10", "--data_path", str(tmp_path)) == 0
    assert run("check", "cifar10", "cifar100", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "cifar10: ready" in out and "cifar100: NOT READY" in out
    assert "cifar-100-python/ lacks meta" in out


def test_check_rejects_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'svhn'"):
        run("check", "svhn", "--data_path", str(tmp_path))


# ---- CIFAR download (torchvision replaced: no network)
def test_cifar_subcommand_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake(name):
        def dataset(root, train, download):
            calls.append((name, root, train, download))
            make_cifar_files(tmp_path, name)
        return dataset

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake("cifar10"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake("cifar100"))
    assert run("cifar", "--data_path", str(tmp_path)) == 0
    assert {c[0] for c in calls} == {"cifar10", "cifar100"}
    assert all(c[1] == os.path.join(str(tmp_path), "cifar") and c[3] for c in calls)
    calls.clear()
    assert run("cifar", "--data_path", str(tmp_path)) == 0  # already there: nothing downloaded
    assert calls == []


def test_cifar_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision

    def offline(root, train, download):
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="could not download cifar10 through torchvision.*no route to host"):
        run("cifar", "--which", "cifar10", "--data_path", str(tmp_path))


# ---- iNaturalist 2018
def test_inat_extract_verify_and_rerun(tmp_path, capsys):
    data = tmp_path / "data"
    make_inat_archives(tmp_path, data / "inaturalist18")
    assert run("check", "inaturalist18", "--data_path", str(data)) == 1
    assert "is in" in capsys.readouterr().out  # archives there, not extracted
    assert run("inat", "--data_path", str(data)) == 0
    out = capsys.readouterr().out
    assert "train2018.json: 3 images listed, 3 found, 3 annotations, 2 categories" in out
    assert "inaturalist18: ready" in out
    assert not [p for p in (data / "inaturalist18").iterdir() if p.name.startswith(".extract-")]
    assert run("inat", "--data_path", str(data)) == 0
    assert "already extracted" in capsys.readouterr().out


def test_inat_check_names_missing_images(tmp_path, capsys):
    inat_tree(tmp_path / "inaturalist18", n_per_split=4)
    missing = tmp_path / "inaturalist18" / "train_val2018" / "Plantae" / "7478" / "val0001abcdef.jpg"
    missing.unlink()
    assert run("check", "inaturalist18", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "val2018.json: 4 images listed, 3 found" in out
    assert "1 of 4 images of val2018.json are missing, first: train_val2018/Plantae/7478/val0001abcdef.jpg" in out
    (tmp_path / "inaturalist18" / "train2018.json").write_text('{"images": [')  # cut short
    run("check", "inaturalist18", "--data_path", str(tmp_path))
    assert "train2018.json is unreadable" in capsys.readouterr().out


def test_inat_without_archives_says_what_to_download(tmp_path, capsys):
    assert run("inat", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"download {prepare_data.INAT_URL}/train_val2018.tar.gz" in out


def test_inat_download_from_local_server(tmp_path, capsys, monkeypatch):
    served = tmp_path / "served"
    make_inat_archives(tmp_path, served)
    # the generated archive stands for the published one: its MD5 is the one to check
    image_archive = served / "train_val2018.tar.gz"
    digest = hashlib.md5(image_archive.read_bytes()).hexdigest()
    monkeypatch.setattr(prepare_data, "INAT_MD5", {image_archive.name: digest})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        data = tmp_path / "data"
        assert run("inat", "--download", "--base_url", f"http://127.0.0.1:{srv.server_port}",
                   "--retries", "0", "--data_path", str(data)) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    assert (data / "inaturalist18" / "train_val2018" / "Plantae").is_dir()
    assert "MD5 verified" in capsys.readouterr().out


def test_inat_refuses_malicious_archive(tmp_path):
    folder = tmp_path / "inaturalist18"
    folder.mkdir()
    with tarfile.open(folder / "train2018.json.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../../evil.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(UserError, match="refusing to extract.*'..'"):
        run("inat", "--data_path", str(tmp_path))
    assert not (tmp_path.parent / "evil.json").exists() and not (folder / "train2018.json").exists()


# ---- ImageNet
def test_imagenet_complete_small_copy_is_ready_with_warnings(tmp_path, capsys):
    make_imagenet(tmp_path)
    assert run("imagenet", "--data_path", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "train: 3 class folders, 6 images" in out and "val: 3 class folders, 6 images" in out
    assert "warning: train: ImageNet-1k has 1000 classes" in out


def test_imagenet_missing_pieces(tmp_path, capsys):
    make_imagenet(tmp_path)
    os.rename(tmp_path / "imagenet" / "val" / WNIDS[0], tmp_path / "imagenet" / "val" / "n09999999")
    (tmp_path / "imagenet" / "train" / "n07777777").mkdir()
    (tmp_path / "imagenet" / "train" / "n08888888.tar").write_bytes(b"tar")
    assert run("check", "imagenet1k", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "val has 1 classes that train lacks: n09999999" in out
    assert "1 class folders without images: n07777777" in out
    assert "1 per-class .tar archives still to extract" in out


def test_imagenet_flat_val_is_detected(tmp_path, capsys):
    make_imagenet(tmp_path, flat_val=True)
    assert run("check", "imagenet1k", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "val/ is flat: 6 images not sorted into class folders" in out and "--val_map" in out


def _write_map(tmp_path, truth, form):
    """A ground-truth file in one of the accepted forms (and its synsets file, if needed)."""
    names = sorted(truth)
    synsets = None
    if form == "pairs":
        text = "".join(f"{n} {truth[n]}\n" for n in names)
    elif form == "kaggle_csv":
        text = "ImageId,PredictionString\n" + "".join(
            f"{os.path.splitext(n)[0]},{truth[n]} 1 2 3 4 {truth[n]} 5 6 7 8\n" for n in names)
    elif form == "caffe_val_txt":  # 0-based indices into an alphabetical synset list
        synsets = sorted(WNIDS)
        text = "".join(f"{n} {synsets.index(truth[n])}\n" for n in names)
    else:  # devkit: one 1-based index per line, in image order, into a non-alphabetical synset list
        synsets = [WNIDS[2], WNIDS[0], WNIDS[1]]
        text = "".join(f"{synsets.index(truth[n]) + 1}\n" for n in names)
    (tmp_path / "map.txt").write_text(text)
    args = ["--val_map", str(tmp_path / "map.txt")]
    if synsets:
        (tmp_path / "synsets.txt").write_text("".join(f"{w} some words, more words\n" for w in synsets))
        args += ["--synsets", str(tmp_path / "synsets.txt")]
    return args


@pytest.mark.parametrize("form", ["pairs", "kaggle_csv", "caffe_val_txt", "devkit"])
def test_imagenet_flat_val_is_sorted(tmp_path, form):
    truth = make_imagenet(tmp_path, flat_val=True)
    args = _write_map(tmp_path, truth, form)
    val = tmp_path / "imagenet" / "val"
    assert run("imagenet", "--data_path", str(tmp_path), *args, "--dry_run") == 1
    assert len(list(val.glob("*.JPEG"))) == len(truth)  # dry run moved nothing
    assert run("imagenet", "--data_path", str(tmp_path), *args) == 0
    for name, wnid in truth.items():
        assert (val / wnid / name).is_file()
    assert run("imagenet", "--data_path", str(tmp_path), *args) == 0  # idempotent


def test_imagenet_val_map_errors(tmp_path):
    truth = make_imagenet(tmp_path, flat_val=True)
    partial = sorted(truth)[:-1]
    (tmp_path / "map.txt").write_text("".join(f"{n} {truth[n]}\n" for n in partial))
    with pytest.raises(UserError, match="no class for 1 of 6 images.*nothing was moved"):
        run("imagenet", "--data_path", str(tmp_path), "--val_map", str(tmp_path / "map.txt"))
    assert len(list((tmp_path / "imagenet" / "val").glob("*.JPEG"))) == 6
    (tmp_path / "idx.txt").write_text("1\n2\n3\n1\n2\n3\n")
    with pytest.raises(UserError, match="pass --synsets"):
        run("imagenet", "--data_path", str(tmp_path), "--val_map", str(tmp_path / "idx.txt"))
    (tmp_path / "bad.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002.JPEG dog\n")
    with pytest.raises(UserError, match="bad.txt:2"):
        run("imagenet", "--data_path", str(tmp_path), "--val_map", str(tmp_path / "bad.txt"))


def test_cli_exit_codes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_data.py"), "check", "cifar10",
                           "--data_path", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1 and "cifar10: NOT READY" in proc.stdout


# ---- the probe's --eval_datasets (ImageNet-v2, -Sketch, -R, -A)
def make_eval_archives(tmp_path, out_dir):
    """The four releases' archives (tar.gz, zip, tar, tar) of small generated folders, named as published."""
    import zipfile

    from datasets.eval_sets import EVAL_SETS, IMAGENET_WNIDS
    from datasets.synthetic import make_eval_sets
    staging = tmp_path / "staging"
    make_eval_sets(str(staging), [IMAGENET_WNIDS[k] for k in (0, 1, 6, 11)], per_class=1, size=16)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in EVAL_SETS.values():
        archive = out_dir / spec.url.rsplit("/", 1)[-1]
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive, "w") as zf:
                for path in sorted((staging / spec.folder).rglob("*")):
                    zf.write(path, str(path.relative_to(staging)))
        else:
            with tarfile.open(archive, "w:gz" if archive.name.endswith(".gz") else "w") as tar:
                tar.add(staging / spec.folder, arcname=spec.folder)


def test_evalsets_download_extract_and_check_from_local_server(tmp_path, capsys):
    served = tmp_path / "served"
    make_eval_archives(tmp_path, served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    data = tmp_path / "data"
    try:
        assert run("evalsets", "--download", "--base_url", f"http://127.0.0.1:{srv.server_port}", "--retries", "0",
                   "--data_path", str(data)) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    out = capsys.readouterr().out
    for name, images, classes in (("imagenet_v2", 4, 4), ("imagenet_sketch", 4, 4), ("imagenet_r", 3, 3),
                                  ("imagenet_a", 2, 2)):
        assert f"{name}: ready" in out and f"{images} images in {classes} class folders" in out, out
    assert "the release has 30000 images in 200 classes" in out  # a partial copy: a warning, not a problem
    assert sorted(p.name for p in (data / "imagenetv2-matched-frequency-format-val").iterdir()) == \
        ["0", "1", "11", "6"]
    assert not [p for p in data.iterdir() if p.name.startswith(".extract-")]
    assert run("evalsets", "imagenet_r", "--data_path", str(data)) == 0
    assert "imagenet-r: already extracted" in capsys.readouterr().out
    assert run("check", "imagenet_a", "--data_path", str(data)) == 0


def test_evalsets_without_archives_says_what_to_download(tmp_path, capsys):
    assert run("evalsets", "imagenet_a", "--data_path", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "imagenet_a: NOT READY" in out and "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar" in out
    with pytest.raises(UserError, match="unknown evaluation set"):
        run("evalsets", "imagenet_c", "--data_path", str(tmp_path))


def test_evalsets_refuses_an_unsafe_zip(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "ImageNet-Sketch.zip", "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(UserError, match="unsafe archive"):
        run("evalsets", "imagenet_sketch", "--data_path", str(tmp_path / "data"), "--archive_dir", str(tmp_path))
    assert not (tmp_path / "escape.txt").exists()
