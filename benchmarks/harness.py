"""What every benchmark here shares: timing, the machine's measured ceilings, and one CSV row format.

Each row: median and p20/p80 time, achieved GB/s and TFLOP/s, the floor (bytes over the measured copy
bandwidth, flops over the measured matmul rate, whichever is larger) and the ratio to it, plus the
device name, torch/triton versions and git SHA. Rows are appended to benchmarks/out/results.csv;
benchmarks/plot.py renders PNGs from it. Absolute CPU times are for ratios only.
"""

import csv
import dataclasses
import functools
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
RESULTS_CSV = os.path.join(OUT_DIR, "results.csv")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device | str = "cpu", *, repeats: int = 10, warmup: int = 2, max_seconds: float = 20.0) -> dict:
    """Median, p20 and p80 wall time of fn() in milliseconds (device-synchronised)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "runs": len(times)}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


@functools.cache
def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0]}


@functools.cache
def ceilings(device_str: str) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and float32/float64 matmul rates (TFLOP/s)."""
    device = torch.device(device_str)
    n_bytes = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, repeats=10)["median_ms"]
    out = {"copy_gbps": 2 * n_bytes / copy / 1e6}
    n = 4096 if device.type == "cuda" else 1024
    for dtype, key in ((torch.float32, "matmul_fp32_tflops"), (torch.float64, "matmul_fp64_tflops")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        t = measure(lambda: a @ a, device, repeats=5)["median_ms"]
        out[key] = 2 * n**3 / t / 1e9
    return out


@dataclasses.dataclass
class Row:
    op: str
    impl: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes: float = 0.0
    flops: float = 0.0
    flop_dtype: str = "fp32"   # which measured matmul rate bounds the flops
    note: str = ""

    def complete(self, device: torch.device | str) -> dict:
        device = torch.device(device)
        ceil = ceilings(str(device))
        rate = ceil[f"matmul_{self.flop_dtype}_tflops"]
        floor_ms = max(self.bytes / ceil["copy_gbps"] / 1e6, self.flops / rate / 1e9)
        row = dataclasses.asdict(self)
        row.update(
            gbps=self.bytes / self.median_ms / 1e6 if self.bytes else 0.0,
            tflops=self.flops / self.median_ms / 1e9 if self.flops else 0.0,
            floor_ms=floor_ms,
            ratio_to_floor=self.median_ms / floor_ms if floor_ms else 0.0,
            device=device_name(device),
            sha=git_sha(),
            **versions(),
        )
        return row


def append_csv(rows: list[dict], path: str = RESULTS_CSV) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fresh = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if fresh:
            writer.writeheader()
        writer.writerows(rows)


def progress(items, label: str):
    """A one-line progress bar on stderr for long sweeps (no dependency)."""
    items = list(items)
    for i, item in enumerate(items):
        sys.stderr.write(f"\r{label} [{'#' * (20 * i // max(len(items), 1)):<20}] {i}/{len(items)}")
        sys.stderr.flush()
        yield item
    sys.stderr.write(f"\r{label} [{'#' * 20}] {len(items)}/{len(items)}\n")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
