"""--wandb: the metrics.jsonl records as a Weights & Biases run, offline here (tests never touch the network); the
run id kept in the run folder so a requeued run continues the same W&B run. The offline run files are read back
with a reader of W&B's transaction log (a leveldb-style log of protobuf Records)."""
import glob
import json
import os
import struct
import sys

import pytest

wandb = pytest.importorskip("wandb")  # the optional extra; setup.sh installs it
from wandb.proto import wandb_internal_pb2  # noqa: E402

import main_linear_probe as probe  # noqa: E402
import main_pretrain  # noqa: E402
from helpers import make_checkpoint, make_cifar, make_imagenet  # noqa: E402
from util import wandb_log  # noqa: E402
from util.cli import UserError  # noqa: E402


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B's own folders in the test's temp folder, no key, no network, quiet; its service stopped at the end."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    yield
    wandb.teardown()


def offline_runs(folder):
    """[(run id, [history rows as {key: float}])] of every offline run under <folder>/wandb/, oldest first."""
    wandb.teardown()  # run.finish() returns before W&B's service has written everything; teardown waits for it
    runs = []
    # oldest first: two runs started in the same second are offline-run-<time>-<id> and offline-run-<time>-<id>-1
    for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb")), key=os.path.getmtime):
        data, pos, buf, run_id, rows = open(path, "rb").read(), 7, b"", None, []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768  # 32 KiB blocks; a block's tail too short for a header is padding
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += left
                continue
            buf = data[pos + 7:pos + 7 + length] if kind in (1, 2) else buf + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(buf)
                kind_name = record.WhichOneof("record_type")
                if kind_name == "run":
                    run_id = record.run.run_id
                elif kind_name == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    rows.append({k: v for k, v in items.items() if not k.startswith("_")})
        runs.append((run_id, rows))
    return runs


def test_a_probe_sweep_logs_each_heads_metrics_offline(tmp_path):
    data, ckpt, dump = str(tmp_path / "data"), str(tmp_path / "r18.pth"), tmp_path / "run"
    make_cifar(data, "cifar10", n_train=64, n_test=20)
    make_checkpoint(ckpt, "resnet18", "raw", seed=1)
    argv = ["--arch", "resnet18", "--pretrained", ckpt, "--data_path", data, "--dump_path", str(dump),
            "--img_size", "32", "--workers", "0", "--batch_size", "32", "--epochs", "2", "--wd", "5e-4", "1e-3",
            "--wandb"]  # auto: no key here, so offline, and the log says why
    probe.main(probe.get_args_parser().parse_args(argv))
    run_id = json.load(open(dump / "wandb.json"))["id"]
    assert "W&B: offline (auto: no W&B API key" in (dump / "sweep.log").read_text()
    [(logged_id, rows)] = offline_runs(dump)
    assert logged_id == run_id
    for head in ("wd5e-4_lr0.01", "wd1e-3_lr0.01"):
        records = [json.loads(line) for line in open(dump / head / "metrics.jsonl")]
        logged = [{k.removeprefix(head + "/"): v for k, v in row.items() if k.startswith(head + "/")}
                  for row in rows if any(k.startswith(head + "/") for k in row)]
        assert len(logged) == len(records) == 2
        for record, row in zip(records, logged):
            assert row == {k: v for k, v in record.items()
                           if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_a_requeued_run_continues_the_same_wandb_run(tmp_path):
    folder = str(tmp_path / "run")
    first = wandb_log.WandbRun(folder, "offline", {"lr": 0.1}, "epoch")
    first.add({"epoch": 0, "test_top1": 10.0}, folder)
    first.close()  # the process ends (preempted, requeued)
    run_id = json.load(open(os.path.join(folder, "wandb.json")))["id"]
    again = wandb_log.WandbRun(folder, "offline", {"lr": 0.1}, "epoch")
    again.add({"epoch": 1, "test_top1": 20.0}, folder)
    again.close()
    runs = offline_runs(folder)
    assert [r[0] for r in runs] == [run_id, run_id]  # two processes, one W&B run
    assert [row["test_top1"] for _, rows in runs for row in rows] == [10.0, 20.0]


def test_mode_choice_and_missing_package(tmp_path, monkeypatch):
    assert wandb_log.resolve_mode("auto")[0] == "offline"  # no key (the fixture): never tries the network
    assert wandb_log.resolve_mode("online") == ("online", "--wandb online")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_log.resolve_mode("online") == ("disabled", "WANDB_MODE in the environment")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "wandb.json").write_text("{")
    with pytest.raises(UserError, match="wandb.json is unreadable"):
        wandb_log.run_id(str(tmp_path / "bad"))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="uv sync --extra wandb"):
        wandb_log.require_wandb()


def test_pretraining_logs_its_evaluations_offline(tmp_path):
    data, out = str(tmp_path / "data"), tmp_path / "pre"
    make_imagenet(data, num_classes=2, n_train=4, n_val=2, size=16)
    argv = ["--arch", "resnet18", "--data_path", data, "--img_size", "8", "--global_batch", "4", "--workers", "0",
            "--steps", "2", "--save_steps", "--eval_every", "1", "--precision", "fp32", "--bn_refresh_batches", "1",
            "--warmup_steps", "1", "--output_dir", str(out / "ckpt"), "--dump_path", str(out / "run"),
            "--wandb", "offline"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    records = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    [(_, rows)] = offline_runs(str(out / "run"))
    assert [row["step"] for row in rows] == [r["step"] for r in records] and len(records) >= 2
    assert [row["test_top1"] for row in rows] == [r["test_top1"] for r in records]
