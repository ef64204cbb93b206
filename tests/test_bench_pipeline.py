"""tools/benchmark.py's data-pipeline sections run end to end on CPU in their smallest form (the GPU rows of
scripts/device_check.sh pipeline run the same code with --device cuda) and record their rows; the cost
formula of Figure 2 (numbers are not asserted, except the formula's arithmetic)."""
import subprocess

import pytest

from tools import bench_pipeline, benchmark
from util.cli import UserError


def run(tmp_path, *argv):
    results = tmp_path / "benchmarks.md"
    benchmark.main(benchmark.get_args_parser().parse_args([*argv, "--results", str(results)]))
    return results.read_text()


def test_e2e_on_cpu_records_step_and_extraction_rates(tmp_path, capsys):
    text = run(tmp_path, "e2e", "--device", "cpu", "--arch", "resnet18", "--img_size", "32", "--batch_size", "4",
               "--steps", "1", "--workers", "1", "--decoder", "turbo", "--sf_foreach")
    row = [line for line in text.splitlines() if "resnet18 32px" in line][0]
    assert "## e2e" in text and row.count("|") == text.splitlines()[text.splitlines().index(row) - 2].count("|")
    out = capsys.readouterr().out
    assert "pretraining step, JPEGs through 1 workers" in out and "Figure 2 from scratch" in out
    # scripts/device_check.sh's cost step: Figure 2's hours from each recorded e2e row's own rates
    benchmark.main(benchmark.get_args_parser().parse_args(["cost", "--from_e2e", str(tmp_path / "benchmarks.md")]))
    cost = capsys.readouterr().out
    step, extraction = (float(row.split("|")[i]) for i in (9, 12))
    expected = bench_pipeline.figure2_cost(step, extraction, "one_pass + feature_cache", extraction)[2]
    assert "resnet18 32px, batch 4, fp32, channels_last, turbo pipeline" in cost
    assert f"= {expected:,.0f} h" in cost.splitlines()[-1]
    (tmp_path / "other.md").write_text("## data\n| 2026-12-03 | a row of another section |\n")
    with pytest.raises(UserError, match="no row under '## e2e'"):
        bench_pipeline.e2e_rates(str(tmp_path / "other.md"))
    with pytest.raises(UserError, match="cannot read"):
        bench_pipeline.e2e_rates(str(tmp_path / "missing.md"))


@pytest.mark.slow  # 40 s on 2 cores: 60 images through seven paths
def test_data_quick_records_a_row_per_path(tmp_path):
    text = run(tmp_path, "data", "--quick", "--no-probe", "--workers", "1")
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 7 and "pil (reference)" in rows[0]


def test_gpu_decode_code_runs_on_cpu(tmp_path):
    text = run(tmp_path, "gpu_decode", "--device", "cpu", "--quick", "--images", "8", "--batch_size", "4")
    assert "## gpu decode" in text and "| cpu | 4 |" in text


def test_figure2_cost_formula():
    pretrain, probes, total = bench_pipeline.figure2_cost(train_rate=2000, forward_rate=10000, layout="per_wd")
    images = 5 * 450_000 * 1024
    evals = 5 * 90 * (50 * 128 + 50_000)
    assert pretrain == pytest.approx((images / 2000 + evals / 10000) / 3600)
    assert probes == pytest.approx(2_136e6 / 10000 / 3600) and total == pytest.approx(pretrain + probes)
    cached = bench_pipeline.figure2_cost(2000, 10000, "one_pass + feature_cache", extraction_rate=20000)[1]
    assert cached == pytest.approx(30.6e6 / 20000 / 3600)


def test_device_check_script_parses():
    assert subprocess.run(["bash", "-n", "scripts/device_check.sh"]).returncode == 0
