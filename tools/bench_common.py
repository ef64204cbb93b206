"""What every section of tools/benchmark.py shares: the machine's description, the results file's rows, device
synchronisation and a timed in-process probe (tools/benchmark.py and tools/bench_pipeline.py import it)."""
import os
import platform
import time

from util import layout, log_lines


# ---------------------------------------------------------------- machine and results file
def machine_description():
    import torch
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{count}x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def record(path, section, intro, header, row):
    """Append a table row under `## section` (created with its intro and table header when missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nWritten by `python tools/benchmark.py`.\n"
    lines = text.rstrip("\n").split("\n")
    title = f"## {section}"
    if title not in lines:
        lines += ["", title, "", *intro, "", header, "|" + "---|" * (header.count("|") - 1)]
        end = len(lines)
    else:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table = [i for i in range(start + 1, end) if lines[i].startswith("|")]
        if table:  # under the section's table, above any reading of it that follows
            end = table[-1] + 1
        while end > start and not lines[end - 1].strip():
            end -= 1
    lines.insert(end, row)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, warmup, steps, batch, device):
    """Images/s of `step` (one batch of `batch` images) over `steps` calls after `warmup` untimed ones; the device
    is synchronised around the timed calls, so queued GPU work is counted."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def timed_probe(argv, log_name=layout.PROBE_LOG):
    """Wall seconds and final top-1 of one main_linear_probe.py run (in this process)."""
    import contextlib
    import io

    import main_linear_probe
    start = time.perf_counter()
    parsed = main_linear_probe.get_args_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' logs stay in their folders
        main_linear_probe.main(parsed)
    seconds = time.perf_counter() - start
    with open(os.path.join(parsed.dump_path, log_name)) as f:
        return seconds, log_lines.parse_final(f.read())
