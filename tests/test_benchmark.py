"""tools/benchmark.py runs end to end in its quick mode and records its rows (the numbers are not asserted)."""
import pytest

from tools import benchmark


@pytest.mark.parametrize("section,extra", [
    ("backbone", ["--arch", "resnet18", "--steps", "1", "--img_size", "64", "--batch_size", "4"]),
    pytest.param("probe", ["--epochs", "1", "--k", "2"], marks=pytest.mark.slow),  # 20 s: five probes
])
def test_benchmark_quick_mode_records_a_row(tmp_path, section, extra):
    results = tmp_path / "benchmarks.md"
    benchmark.main(benchmark.get_args_parser().parse_args([section, "--quick", "--results", str(results), *extra]))
    text = results.read_text()
    assert f"## {section}" in text and "(quick)" in text
    row = [line for line in text.splitlines() if "(quick)" in line][0]
    header = next(line for line in text.splitlines() if line.startswith("| date"))
    assert row.count("|") == header.count("|") and row.rstrip().endswith("x |")  # ends with its speed-up
