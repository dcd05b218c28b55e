"""What every benchmark here shares: shapes, inputs, timing, the machine's measured ceilings, one CSV row
format, the sweep loop and the command line.

Each benchmark script (bench_<op>.py) declares, for one (shape, batch, dtype) point, a list of `Case`s: one
per implementation ("impl") of its op, with a cost model (bytes, flops) stated in the script. `sweep` times
the cases of one point side by side, in interleaved rounds (a shared machine's load then hits every impl
alike, so their ratios hold even when absolute times drift), and writes one `Row` per case.

Each row: median and p20/p80 time, achieved GB/s and TFLOP/s, the floor (bytes over the measured copy
bandwidth, flops over the measured matmul rate, whichever is larger) and the ratio to it, the fractions of
both ceilings reached, plus the device name, torch/triton versions and git SHA. Rows are appended to
benchmarks/out/results.csv; benchmarks/plot.py renders PNGs from it. Absolute CPU times are for ratios only.

An impl that cannot fit a point (estimated peak memory over half the free memory, or a floor alone over
--max-case-seconds) is skipped with the reason printed and reported. --threads sets torch's CPU threads
while timing: on a shared machine one thread gives steadier ratios than two.

Cost models count compulsory work: `bytes` is each input read once and each output written once in its
own dtype; `flops` is the arithmetic the method needs (each script says what it counts). The floor is
therefore a lower bound no implementation of that method can beat on this device.
"""

import argparse
import contextlib
import csv
import dataclasses
import functools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from tests import inputs

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
RESULTS_CSV = os.path.join(OUT_DIR, "results.csv")
RUN_ID = time.strftime("%Y-%m-%dT%H:%M:%S")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_RUNS = 3          # timed calls per impl, at least, whatever the time budget
ROUNDS = 3            # interleaved rounds over the impls of one point
CLOCKS = ("wall", "process")


# ---------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """One workload: Nv visual tokens of width D carved to `budget`, inside a prompt of N = prefix + Nv + text
    keys seen by Hq query heads over Hk key heads of size head_dim. The visual span is `frames` images
    (tiles, video frames) of Nv / frames tokens each, generated one frame at a time."""

    name: str
    num_visual: int
    dim: int
    budget: int
    frames: int = 1
    heads_q: int = 32
    heads_k: int = 32
    head_dim: int = 128
    prefix: int = 35
    text: int = 89

    @property
    def num_keys(self) -> int:
        return self.prefix + self.num_visual + self.text


# Llama-2-7B's decoder (D 4096, 32 x 128 heads) behind every shape; budgets keep the paper's 128 / 576 ratio.
SHAPES = {
    "tiny": Shape("tiny", 48, 64, 12, frames=2, heads_q=4, heads_k=2, head_dim=16, prefix=5, text=7),  # tests only
    "llava15": Shape("llava15", 576, 4096, 128),                   # one 336 px image; N = 700
    "llava_next": Shape("llava_next", 2880, 4096, 640, frames=5),  # anyres: base image + 4 tiles of 576
    "video": Shape("video", 16384, 4096, 3641, frames=64),         # 64 frames of 256 tokens
    # Named with --shapes only (not in --full): grouped-query attention, and the longest prompt (N = 32892).
    "llava15_gqa": Shape("llava15_gqa", 576, 4096, 128, heads_k=8),      # a Mistral-7B-like decoder: 8 KV heads
    "video_long": Shape("video_long", 32768, 4096, 7282, frames=128),   # 128 frames of 256 tokens
}
STANDARD_SHAPES = ("llava15",)
FULL_SHAPES = ("llava15", "llava_next", "video")


# ---------------------------------------------------------------------------------------------- inputs
# Every input comes from tests/inputs.py, the factory the tests use. A multi-frame span is its frames
# side by side (each frame its own low-rank image): the factory's cost then grows with Nv, not Nv^2 D.
# Images are generated one at a time (the factory works in float64: a video batch at once would need 13 GiB).


@functools.lru_cache(maxsize=2)
def _hidden_cpu(shape: Shape, batch: int) -> torch.Tensor:
    per_frame = shape.num_visual // shape.frames
    return torch.stack([inputs.hidden_states(shape.frames, per_frame, shape.dim, seed=11 + b).reshape(-1, shape.dim)
                        for b in range(batch)])


def hidden(shape: Shape, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """hidden [B, Nv, D] in dtype on device."""
    return _hidden_cpu(shape, batch).to(device=device, dtype=dtype)


def attn(shape: Shape, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """attn [B, Nv] float32 (what last_query_attention returns whatever the model dtype)."""
    return inputs.attention_scores(batch, shape.num_visual, seed=seed).to(device)


def queries_keys(shape: Shape, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, d], k [B, Hk, N, d] in dtype on device."""
    q, k = inputs.queries_keys(batch, shape.heads_q, shape.heads_k, shape.num_keys, shape.head_dim, seed=3)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- timing


def _timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """A function that calls fn once and returns (milliseconds, fn's result).

    clock "wall": CUDA events on a GPU, wall time on the CPU. "process" (CPU only): the process's CPU time, which
    on a shared machine measures the work of a one-thread call rather than the neighbours' load."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "process" and device.type != "cpu":
        raise ValueError(f"clock 'process' measures CPU time: it cannot time work on {device}")
    if device.type == "cuda":
        # Zeroing a buffer larger than any L2 before each call: every call starts from a cold cache, so
        # memory-bound kernels are measured against HBM, not against the input left in L2 by the last call.
        scratch = torch.empty(256 << 20, dtype=torch.int8, device=device)

        def timed_cuda(fn):
            scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), out

        return timed_cuda

    now = time.process_time if clock == "process" else time.perf_counter

    def timed_cpu(fn):
        start = now()
        out = fn()
        return (now() - start) * 1e3, out

    return timed_cpu


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "runs": len(times)}


def measure_many(fns: list[Callable[[], Any]], device: torch.device | str = "cpu", *, repeats: int = 10,
                 max_seconds: float = 10.0, clock: str = "wall") -> tuple[list[dict], list[Any]]:
    """Time several functions side by side: one warm-up call each (compilation, first-touch allocation),
    then ROUNDS interleaved rounds. Function i gets max(MIN_RUNS, min(repeats, max_seconds / t_i)) timed
    calls in all (t_i: its warm-up time), spread evenly over the rounds. clock: see _timer.

    Returns per function {median_ms, p20_ms, p80_ms, runs}, and the result of its last call.
    """
    timed = _timer(torch.device(device), clock)
    warm = [timed(fn) for fn in fns]
    outputs = [out for _, out in warm]
    calls = [max(MIN_RUNS, min(repeats, int(max_seconds * 1e3 / max(ms, 1e-3)))) for ms, _ in warm]
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(ROUNDS):
        for i, fn in enumerate(fns):
            for _ in range(math.ceil(calls[i] * (r + 1) / ROUNDS) - math.ceil(calls[i] * r / ROUNDS)):
                ms, outputs[i] = timed(fn)
                samples[i].append(ms)
    return [_stats(s) for s in samples], outputs


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu", *, repeats: int = 10, max_seconds: float = 10.0,
            clock: str = "wall") -> dict:
    """Median, p20 and p80 time of fn() in milliseconds (device-synchronised), as measure_many."""
    return measure_many([fn], device, repeats=repeats, max_seconds=max_seconds, clock=clock)[0][0]


# ---------------------------------------------------------------------------------------------- the machine


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
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0]}


def ceilings(device_str: str) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and float32/float64 matmul rates (TFLOP/s), with the
    threads torch uses now."""
    return _ceilings(device_str, torch.get_num_threads())


@functools.cache
def _ceilings(device_str: str, threads: int) -> dict:
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


def memory_available(device: torch.device) -> int:
    """Bytes free on the device now (CPU: MemAvailable; the machine may be shared)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


# ---------------------------------------------------------------------------------------------- rows


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

    @classmethod
    def from_stats(cls, op: str, impl: str, shape: str, dtype: str, stats: dict, **cost) -> "Row":
        """A row from measure / measure_many's stats; cost: bytes, flops, flop_dtype, note."""
        return cls(op, impl, shape, dtype, stats["median_ms"], stats["p20_ms"], stats["p80_ms"], **cost)

    def complete(self, device: torch.device | str) -> dict:
        device = torch.device(device)
        ceil = ceilings(str(device))
        rate = ceil[f"matmul_{self.flop_dtype}_tflops"]
        floor_ms = floor_of(self.bytes, self.flops, self.flop_dtype, device)
        gbps = self.bytes / self.median_ms / 1e6 if self.bytes else 0.0
        tflops = self.flops / self.median_ms / 1e9 if self.flops else 0.0
        row = dataclasses.asdict(self)
        row.update(
            gbps=gbps,
            tflops=tflops,
            bw_fraction=gbps / ceil["copy_gbps"],
            matmul_fraction=tflops / rate,
            floor_ms=floor_ms,
            ratio_to_floor=self.median_ms / floor_ms if floor_ms else 0.0,
            device=device_name(device),
            sha=git_sha(),
            run=RUN_ID,
            **versions(),
        )
        return row


def floor_of(n_bytes: float, flops: float, flop_dtype: str, device: torch.device | str) -> float:
    """Milliseconds: the larger of bytes / copy bandwidth and flops / matmul rate."""
    ceil = ceilings(str(torch.device(device)))
    return max(n_bytes / ceil["copy_gbps"] / 1e6, flops / ceil[f"matmul_{flop_dtype}_tflops"] / 1e9)


def append_csv(rows: list[dict], path: str = RESULTS_CSV) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    columns = list(rows[0])
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise ValueError(f"{path} has the columns {header}, rows here have {columns}: move the old file away or pass --csv")
    fresh = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if fresh:
            writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- cases and sweeps

# On CUDA the auto backend runs the score ops as Triton kernels (tokencarve_kernels/backend.py): their
# package rows are labelled "triton" there. Interpreted Triton on the CPU is never timed (meaningless).
TRITON_OPS = ("info_scores", "info_scores_randomized", "last_query_attention")
PACKAGE_IMPLS = ("tokencarve", "triton")   # the labels package_impl gives


def package_impl(op: str, device: torch.device) -> str:
    """The impl label of the package's own op on this device: one of PACKAGE_IMPLS."""
    return "triton" if device.type == "cuda" and op in TRITON_OPS else "tokencarve"



@dataclasses.dataclass
class Case:
    """One implementation of one op at one point, with its cost model.

    peak_bytes: what the call allocates beyond its inputs (decides whether it fits the device)."""

    op: str
    impl: str
    fn: Callable[[], Any]
    bytes: float
    flops: float
    flop_dtype: str = "fp32"
    note: str = ""
    peak_bytes: float = 0.0


@dataclasses.dataclass
class Skip:
    op: str
    impl: str
    reason: str


@dataclasses.dataclass
class Report:
    rows: list[dict] = dataclasses.field(default_factory=list)
    skips: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def extend(self, other: "Report") -> None:
        self.rows += other.rows
        self.skips += other.skips
        self.notes += other.notes


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring: its first line, then the rest (the commands) verbatim."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog="\n".join(doc.splitlines()[1:]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def common_arguments(p: argparse.ArgumentParser, *, repeats: int | None, max_seconds: float, csv: str = RESULTS_CSV,
                     threads: bool = True, devices: list[str] | None = None) -> argparse.ArgumentParser:
    """The options of every script that times something: --device, --threads, --repeats, --max-seconds, --csv,
    --no-csv, with the script's defaults.

    repeats None: the script picks it by device after parsing (its docstring says how). threads False: no
    --threads (the script sets the threads itself). devices: the accepted --device values (default: any)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=devices,
                   help="where to time (default: cuda where there is one, else cpu)")
    if threads:
        p.add_argument("--threads", type=int, help="torch CPU threads while timing (default: torch's). 1 is steadier on "
                       "a shared machine: a parallel region's threads wait for each other, and a busy core stalls them all")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed calls per case at most, {MIN_RUNS} at least (default: "
                   + ("%(default)s)" if repeats is not None else "by device, as the text below says)"))
    p.add_argument("--max-seconds", type=float, default=max_seconds,
                   help=f"timing budget per case and point: fewer calls (not under {MIN_RUNS}) where they are slower "
                   "(default: %(default)s)")
    p.add_argument("--csv", default=csv, help="results file (appended)")
    p.add_argument("--no-csv", action="store_true", help="append no rows")
    return p


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line every bench script shares."""
    p = common_arguments(argument_parser(doc), repeats=10, max_seconds=10.0)
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--shapes", nargs="+", default=list(STANDARD_SHAPES), choices=list(SHAPES))
    p.add_argument("--full", action="store_true", help=f"shapes {', '.join(FULL_SHAPES)} (overrides --shapes)")
    p.add_argument("--impls", nargs="+", help="run only these implementations (default: all)")
    p.add_argument("--max-case-seconds", type=float, default=120.0,
                   help="skip an impl whose floor alone, over its %d calls, exceeds this" % (MIN_RUNS + 1))
    p.add_argument("--dry-run", action="store_true",
                   help="time nothing: list what would be timed (with its floor) and what would be skipped, and why")
    p.add_argument("--no-table", action="store_true", help="print no table at the end (benchmarks.run prints one)")
    return p


CasesFn = Callable[[Shape, int, torch.dtype, torch.device, argparse.Namespace], list]
# (shape, batch, dtype name, {(op, impl): output or row}) -> lines to print
LinesFn = Callable[[Shape, int, str, dict], list[str]]

# The package's outputs must match python_ref's to this relative error (max |diff| / max |ref|) for the
# benchmark to count: a gross check that the right computation was timed, not the tests' tolerance.
PACKAGE_TOLERANCE = 1e-3


def state_tolerance(dtype: str) -> float:
    """PACKAGE_TOLERANCE for hidden states in dtype (fp16 / bf16 outputs may differ by a rounding)."""
    return max(PACKAGE_TOLERANCE, 2 * torch.finfo(DTYPES[dtype]).eps)


def package_flop_dtype(device: torch.device) -> str:
    """The matmul rate that bounds the package's scoring: float64 Gram on the CPU; on CUDA the Triton kernels
    are taken to run float32 (if they ran float64, the floor would be optimistic)."""
    return "fp64" if device.type == "cpu" else "fp32"


def compare_scores(op: str, shape: Shape, batch: int, dtype: str, outputs: dict) -> list[str]:
    """Scores of every impl of op against python_ref's; the package's must be within PACKAGE_TOLERANCE."""
    ref = outputs.get((op, "python_ref"))
    if ref is None:
        return []
    errs = []
    for (o, impl), out in outputs.items():
        if o != op or impl == "python_ref":
            continue
        err = inputs.rel_err(out, ref)
        if impl in PACKAGE_IMPLS and not err <= PACKAGE_TOLERANCE:
            raise AssertionError(f"{op} {impl} at {label(shape, batch)} {dtype}: rel err {err:.1e} vs python_ref")
        errs.append(f"{impl} {err:.1e}")
    return [f"{op} {label(shape, batch)} {dtype}: rel err vs python_ref: {', '.join(errs)}"]


def too_big(peak_bytes: float, device: torch.device) -> str | None:
    """Why an allocation of peak_bytes must not be tried on this device now (more than half its free
    memory: the machine may be shared), or None."""
    budget = 0.5 * memory_available(device)
    if peak_bytes > budget:
        return f"needs about {peak_bytes / 2**30:.1f} GiB, half the free {device.type} memory is {budget / 2**30:.1f} GiB"
    return None


def _fits(case: Case, device: torch.device, args: argparse.Namespace) -> str | None:
    """Why the case must be skipped on this device, or None."""
    if reason := too_big(case.peak_bytes, device):
        return reason
    floor_s = floor_of(case.bytes, case.flops, case.flop_dtype, device) / 1e3
    if floor_s * (MIN_RUNS + 1) > args.max_case_seconds:
        return (f"its floor alone is {floor_s:.0f} s per call ({case.flops / 1e12:.2g} TFLOP at the measured "
                f"{case.flop_dtype} matmul rate): {MIN_RUNS + 1} calls exceed --max-case-seconds {args.max_case_seconds:g}")
    return None


def sweep(name: str, args: argparse.Namespace, cases_fn: CasesFn, check_fn: LinesFn | None = None,
          ratios_fn: LinesFn | None = None) -> Report:
    """Every (shape, batch, dtype) point of args: build the cases, skip what does not fit, time the rest side
    by side, append their rows to the CSV, print ratios_fn's lines on their rows and check_fn's on their
    outputs (check_fn raises when an output is wrong), print the table."""
    with cpu_threads(args.threads):
        return _sweep(name, args, cases_fn, check_fn, ratios_fn)


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """torch's CPU threads set to count (None: unchanged) inside the block, restored after it."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sweep(name, args, cases_fn, check_fn, ratios_fn) -> Report:
    device = torch.device(args.device)
    shapes = FULL_SHAPES if args.full else args.shapes
    points = [(SHAPES[s], b, d) for s in shapes for b in args.batch for d in args.dtype]
    report = Report()
    for shape, batch, dtype_name in progress(points, name):
        cases = cases_fn(shape, batch, DTYPES[dtype_name], device, args)
        runnable = []
        for case in cases:
            if args.impls and case.impl not in args.impls:
                continue
            reason = case.reason if isinstance(case, Skip) else _fits(case, device, args)
            if reason:
                report.skips.append({"op": case.op, "impl": case.impl, "shape": label(shape, batch),
                                     "dtype": dtype_name, "reason": reason})
            else:
                runnable.append(case)
        if args.dry_run:
            report.notes += [f"would time {c.op} {c.impl} at {label(shape, batch)} {dtype_name}: floor "
                             f"{floor_of(c.bytes, c.flops, c.flop_dtype, device) / 1e3:.3g} s per call" for c in runnable]
            continue
        if not runnable:
            continue
        stats, outputs = measure_many([c.fn for c in runnable], device, repeats=args.repeats, max_seconds=args.max_seconds)
        rows = [Row.from_stats(c.op, c.impl, label(shape, batch), dtype_name, s, bytes=c.bytes, flops=c.flops,
                               flop_dtype=c.flop_dtype, note=c.note).complete(device) for c, s in zip(runnable, stats)]
        if not args.no_csv:
            append_csv(rows, args.csv)
        report.rows += rows
        lines = ratios_fn(shape, batch, dtype_name, {(c.op, c.impl): row for c, row in zip(runnable, rows)}) if ratios_fn else []
        if check_fn:
            lines += check_fn(shape, batch, dtype_name, {(c.op, c.impl): out for c, out in zip(runnable, outputs)})
        for line in lines:
            print(line)
        report.notes += lines
    if not args.no_table:
        print_summary(report, [n for n in report.notes if n.startswith("would time")])
    return report


def print_summary(report: Report, notes: list[str]) -> None:
    """The end of a sweep or of a set of sweeps: the table of report's rows (with summarize's speed-ups), a blank
    line, the given notes, the skips with their reasons."""
    print_table(summarize(report.rows), SUMMARY_COLUMNS)
    print()
    if notes:
        print("\n".join(notes))
    print_skips(report.skips)


def print_skips(skips: list[dict]) -> None:
    for skip in skips:
        print(f"skipped {skip['op']} {skip['impl']} at {skip['shape']} {skip['dtype']}: {skip['reason']}")


def label(shape: Shape, batch: int) -> str:
    """The shape column: enough to tell every point apart, and to rebuild it."""
    return f"{shape.name} B{batch} Nv{shape.num_visual} D{shape.dim}"


# ---------------------------------------------------------------------------------------------- summaries

# The comparator of each op's "x authors" column: the authors' own route for that step (for carve, their
# scoring alone: the smaller of their costs, so the ratio is conservative).
AUTHORS_OF = {
    "info_scores": ("info_scores", "authors"),
    "info_scores_randomized": ("info_scores", "authors"),
    "last_query_attention": ("last_query_attention", "authors"),
    "carve": ("carve", "authors_scoring"),
}
SUMMARY_COLUMNS = ["op", "impl", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "x_python_ref", "x_authors",
                   "gbps", "tflops", "bw_fraction", "matmul_fraction", "ratio_to_floor"]


def summarize(rows: list[dict]) -> list[dict]:
    """rows plus x_python_ref and x_authors: the comparator's median over this row's (>1: this row is faster),
    taken from rows of the same point (same shape and dtype) in `rows`."""
    by_key = {(r["op"], r["impl"], r["shape"], r["dtype"]): r for r in rows}
    out = []
    for r in rows:
        ref = by_key.get((r["op"], "python_ref", r["shape"], r["dtype"]))
        op, impl = AUTHORS_OF.get(r["op"], (None, None))
        authors = by_key.get((op, impl, r["shape"], r["dtype"]))
        out.append(dict(r, x_python_ref=ref["median_ms"] / r["median_ms"] if ref else None,
                        x_authors=authors["median_ms"] / r["median_ms"] if authors else None))
    return out


def progress(items, label: str):
    """A one-line progress bar on stderr for long sweeps (no dependency)."""
    items = list(items)
    start = time.perf_counter()
    for i, item in enumerate(items):
        sys.stderr.write(f"\r{label} [{'#' * (20 * i // max(len(items), 1)):<20}] {i}/{len(items)} "
                         f"{time.perf_counter() - start:.0f} s")
        sys.stderr.flush()
        yield item
    sys.stderr.write(f"\r{label} [{'#' * 20}] {len(items)}/{len(items)} {time.perf_counter() - start:.0f} s\n")


def print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
