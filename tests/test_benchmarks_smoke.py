"""The benchmark and study scripts on tiny shapes (seconds): they run, write complete rows, and their checks bite."""

import csv
import importlib
import math
import os
import re
import subprocess

import pytest
import torch

import python_ref
from benchmarks import bench_carve, bench_hf, bench_info_scores, bench_last_query_attention, bench_merge, bench_select
from benchmarks import harness, run, scale_info_scores, study_eigensolvers, study_randomized
from tests.inputs import attention_scores, hidden_states

BENCHMARKS = os.path.dirname(os.path.abspath(harness.__file__))

TINY = ["--shapes", "tiny", "--batch", "1", "3", "--dtype", "fp32", "bf16", "--repeats", "3", "--max-seconds", "0.05",
        "--no-table"]
EXPECTED = {  # module -> {op: impls} on the CPU
    bench_last_query_attention: {"last_query_attention": {"tokencarve", "python_ref", "torch_fp32", "authors"}},
    bench_info_scores: {"info_scores": {"tokencarve", "python_ref", "authors"},
                        "info_scores_randomized": {"tokencarve", "python_ref"}},
    bench_select: {"select": {"tokencarve", "python_ref"}},
    bench_merge: {"merge": {"tokencarve", "python_ref"}},
    bench_carve: {"carve": {"tokencarve", "python_ref", "authors_scoring", "authors", "fastv"},
                  "select_merge": {"tokencarve", "python_ref"}},
}
COLUMNS = {"op", "impl", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "bytes", "flops", "gbps", "tflops",
           "bw_fraction", "matmul_fraction", "floor_ms", "ratio_to_floor", "device", "sha", "torch", "triton", "run"}


def _read(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__.split(".")[-1])
def test_bench_script_writes_complete_rows(module, tmp_path):
    path = tmp_path / "results.csv"
    report = module.main([*TINY, "--csv", str(path)])
    rows = _read(path)
    assert len(rows) == len(report.rows) > 0
    assert COLUMNS <= set(rows[0])
    # every impl at every point (select is measured at fp32 only, and says so)
    dtypes = {"fp32"} if module is bench_select else {"fp32", "bf16"}
    for op, impls in EXPECTED[module].items():
        for batch in (1, 3):
            for dtype in dtypes:
                got = {r["impl"] for r in rows if r["op"] == op and r["shape"] == f"tiny B{batch} Nv48 D64" and r["dtype"] == dtype}
                assert got == impls, (op, batch, dtype)
    if module is bench_select:
        assert {s["dtype"] for s in report.skips} == {"bf16"}
    for r in rows:
        median, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80
        assert float(r["floor_ms"]) > 0 and math.isfinite(float(r["ratio_to_floor"])) and float(r["ratio_to_floor"]) > 0
        assert float(r["bytes"]) > 0 and float(r["gbps"]) > 0
        assert r["device"] and r["sha"] and r["torch"] == torch.__version__
    for r in harness.summarize(report.rows):
        assert math.isfinite(r["x_python_ref"]) and r["x_python_ref"] > 0
        if r["op"] in harness.AUTHORS_OF:
            assert math.isfinite(r["x_authors"]) and r["x_authors"] > 0
    # each point's outputs were checked against python_ref
    assert len([n for n in report.notes if "python_ref" in n]) >= 2 * len(dtypes)


def test_carve_prints_the_issue4_ratios_and_the_selection_check(tmp_path, capsys):
    report = bench_carve.main(["--shapes", "tiny", "--batch", "3", "--repeats", "3", "--max-seconds", "0.05",
                               "--no-table", "--no-csv"])
    out = capsys.readouterr().out
    for text in ("carve vs python_ref.carve", "carve vs the authors' scoring (fp32 full SVD)",
                 "select+merge vs python_ref select+merge", "keep_idx identical to python_ref.carve (float64 thin SVD",
                 "select+merge: keep_idx identical"):
        assert text in out
    ratios = bench_carve.ratios(harness.SHAPES["llava15"], 8, "fp32", {
        ("carve", "tokencarve"): {"median_ms": 10.0}, ("carve", "python_ref"): {"median_ms": 20.0},
        ("carve", "authors_scoring"): {"median_ms": 90.0},
        ("select_merge", "tokencarve"): {"median_ms": 1.0}, ("select_merge", "python_ref"): {"median_ms": 6.0}})
    assert "2.0x" in ratios[1] and "NOT met" in ratios[1]      # 20 / 10 < 3: issue 4's target is judged
    assert "9.0x" in ratios[2] and "met" in ratios[2] and "NOT" not in ratios[2]
    assert "6.0x" in ratios[3] and "NOT" not in ratios[3]
    assert len(report.rows) == 7


def test_checks_fail_on_a_wrong_output():
    shape = harness.SHAPES["tiny"]
    x = harness.hidden(shape, 2, torch.float32, torch.device("cpu"))
    attn = harness.attn(shape, 2, torch.device("cpu"))
    import python_ref

    carved, keep = python_ref.carve(x, attn, shape.budget)
    bad = keep.clone()
    bad[1, 0] = (keep[1, 0] + 1) % shape.num_visual
    good = {("carve", "python_ref"): (carved, keep)}
    assert bench_carve.check(shape, 2, "fp32", {**good, ("carve", "tokencarve"): (carved, keep)})
    with pytest.raises(AssertionError, match=r"keep_idx differs .* images \[1\]"):
        bench_carve.check(shape, 2, "fp32", {**good, ("carve", "tokencarve"): (carved, bad)})
    order = python_ref.select(attn, attn.flip(-1), shape.budget)
    with pytest.raises(AssertionError, match="order differs"):
        bench_select.check(shape, 2, "fp32", {("select", "python_ref"): order, ("select", "tokencarve"): order.flip(-1)})
    scores = python_ref.info_scores(x)
    with pytest.raises(AssertionError, match="rel err"):
        bench_info_scores.check(shape, 2, "fp32", {("info_scores", "python_ref"): scores,
                                                   ("info_scores", "tokencarve"): scores * 1.01})


def test_skips_name_the_reason(tmp_path):
    # a point whose every impl would exceed the time limit is skipped, with the floor that decided it
    report = bench_info_scores.main(["--shapes", "llava15", "--batch", "1", "--max-case-seconds", "1e-6", "--no-csv",
                                     "--no-table", "--rank", "0"])
    assert report.rows == []
    assert {s["impl"] for s in report.skips} == {"tokencarve", "python_ref", "authors"}
    assert all("--max-case-seconds" in s["reason"] for s in report.skips)


def test_dry_run_times_nothing_and_lists_each_impl(tmp_path):
    report = bench_carve.main(["--shapes", "tiny", "--batch", "1", "--dry-run", "--csv", str(tmp_path / "r.csv"),
                               "--no-table"])
    assert report.rows == [] and not (tmp_path / "r.csv").exists()
    planned = {note.split()[3] for note in report.notes if note.startswith("would time carve ")}
    assert planned == EXPECTED[bench_carve]["carve"]


def test_threads_apply_while_timing_and_are_restored(tmp_path):
    before = torch.get_num_threads()
    report = bench_select.main(["--shapes", "tiny", "--batch", "1", "--threads", "1", "--no-csv", "--no-table"])
    assert all(r["device"].endswith("(1 threads)") for r in report.rows) and report.rows
    assert torch.get_num_threads() == before


def test_measure_many_interleaves_and_bounds_the_calls():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(2)]
    stats, outputs = harness.measure_many(fns, repeats=5, max_seconds=10.0)
    assert [s["runs"] for s in stats] == [5, 5] and outputs == [None, None]
    # one warm-up call each, then 3 rounds over both functions: 2 + 2 + 1 timed calls each
    assert calls == [0, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1]


def test_run_rewrites_the_results_block(tmp_path):
    results = tmp_path / "RESULTS.md"
    begin, end = run.markers("cpu")
    gpu_block = "{}\nGPU: not yet measured\n{}\n".format(*run.markers("cuda"))  # another device's block stays
    results.write_text(f"# Results\n\nkept text\n\n{begin}\nold\n{end}\n\n{gpu_block}trailer\n")
    run.main(["--shapes", "tiny", "--batch", "1", "--repeats", "3", "--max-seconds", "0.05", "--csv",
              str(tmp_path / "r.csv"), "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.endswith(f"\n{gpu_block}trailer\n")
    assert "\nold\n" not in text and text.count(begin) == 1
    assert "Command: `python -m benchmarks.run --shapes tiny" in text
    assert "| op | impl | shape |" in text and "| carve | authors_scoring |" in text
    assert "carve vs python_ref.carve" in text and "Measured ceilings" in text
    assert len(_read(tmp_path / "r.csv")) == text.count("| tiny B1 Nv48 D64 |")


def test_plot_renders_a_png_per_op(tmp_path):
    pytest.importorskip("matplotlib", reason="benchmarks/plot.py needs matplotlib (not in the test environment)")
    from benchmarks import plot

    path = tmp_path / "r.csv"
    bench_merge.main([*TINY, "--csv", str(path)])
    written = plot.main(["--csv", str(path), "--out", str(tmp_path)])
    assert len(written) == 1 and open(written[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _finite_positive(*values) -> bool:
    return all(math.isfinite(float(v)) and float(v) > 0 for v in values)


# ---------------------------------------------------------------------------------------------- every script


def _scripts() -> list[str]:
    """The modules of benchmarks/ with a command line (a main function)."""
    names = sorted(f[:-3] for f in os.listdir(BENCHMARKS) if f.endswith(".py") and not f.startswith(("test_", "_")))
    return [n for n in names if re.search(r"^def main\(", open(os.path.join(BENCHMARKS, f"{n}.py")).read(), re.M)]


@pytest.mark.parametrize("name", _scripts())
def test_every_script_has_a_help_that_names_its_command(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    assert f"python -m benchmarks.{name}" in module.__doc__
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert f"python -m benchmarks.{name}" in capsys.readouterr().out


def test_gpu_session_script_parses_and_names_existing_scripts():
    path = os.path.join(BENCHMARKS, "gpu_session.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    modules = set(re.findall(r"-m benchmarks\.(\w+)", text))
    assert {"run", "study_eigensolvers", "bench_hf"} <= modules
    assert modules <= set(_scripts()), modules - set(_scripts())
    for test_file in set(re.findall(r"\b(tests/test_\w+\.py)", text)):
        assert os.path.exists(os.path.join(BENCHMARKS, os.pardir, test_file)), test_file


# ---------------------------------------------------------------------------------------------- the studies


def test_study_randomized_tiny_shape(tmp_path):
    path, md = tmp_path / "study.csv", tmp_path / "study.md"
    rows = study_randomized.main(["--shape", "64", "48", "--ranks", "8", "24", "--budget", "16", "--csv", str(path),
                                  "--md", str(md)])
    written = _read(path)
    # 2 spectra x 2 ranks x 2 oversamplings x 3 power iterations x 2 tails, one seed
    assert len(rows) == len(written) == 48
    for r in written:
        assert 0 <= float(r["overlap"]) <= 1 and 0 <= float(r["ab_agree"]) <= 1 and 0 <= float(r["fused_overlap"]) <= 1
        assert _finite_positive(r["gflop"], r["flop_ratio"]) and r["budget"] == "16"
    assert "| 64 | 48 | 6 | 24 | 16 | 2 | none |" in md.read_text()
    assert len(study_randomized.main(["--summarize", "--csv", str(path)])) == 48


def test_study_randomized_selection_stats_can_fail():
    x = hidden_states(1, 64, 48, seed=3).double()
    attn = attention_scores(1, 64, seed=3)
    exact = python_ref.info_scores_gram(x)[0]
    order = python_ref.select(attn, exact[None].float(), 16, attn_weight=0.0)[0]
    fused = python_ref.select(attn, exact[None].float(), 16, attn_weight=0.5)[0]
    assert study_randomized.selection_stats(exact, order, fused, attn, 16) == (1.0, 1.0, 1.0)
    overlap, _, fused_overlap = study_randomized.selection_stats(-exact, order, fused, attn, 16)
    assert overlap < 1.0 and fused_overlap < 1.0


def test_scale_info_scores_tiny(tmp_path, monkeypatch, capsys):
    path, png = tmp_path / "r.csv", tmp_path / "scale.png"
    argv = ["--dim", "32", "--nvs", "16,64,128", "--ranks", "8", "--repeats", "3", "--csv", str(path),
            "--png", str(png)]
    curves = scale_info_scores.main(argv)
    assert set(curves) == {"exact", "rank 8"} and all(len(points) == 3 for points in curves.values())
    rows = _read(path)
    assert len(rows) == 6 and {r["impl"] for r in rows} == {"exact", "rank8"}
    assert all(_finite_positive(r["median_ms"], r["flops"], r["floor_ms"]) for r in rows)
    assert "log-log slope over Nv >= 2 D" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a wrong computation stops the run: the op's scores against a reference that is off by 1%
    wrong = type("WrongRef", (), {"info_scores": staticmethod(lambda *a, **k: python_ref.info_scores(*a, **k) * 1.01)})
    monkeypatch.setattr(scale_info_scores, "python_ref", wrong)
    with pytest.raises(AssertionError, match="rel err"):
        scale_info_scores.main([*argv, "--no-csv"])


def test_study_eigensolvers_smoke(tmp_path):
    path = tmp_path / "r.csv"
    rows = study_eigensolvers.main(["--smoke", "--threads", "1", "--csv", str(path)])
    impls = {r["impl"] for r in rows}
    expected = {"scores/op_tokencarve", "scores/authors", "gram/torch_fp64", "eigh/fp64_lapack", "eigh/fp32",
                "eigh/fp32_refined", "row_l1/torch"}
    tis, _ = study_eigensolvers.triton_module(torch.device("cpu"))
    if tis is not None:  # the tests run Triton in its interpreter (the root conftest sets TRITON_INTERPRET)
        expected |= {"finite/triton", "gram/triton_fp64", "row_l1/triton"}
    assert impls == expected
    assert len(_read(path)) == len(rows)
    assert all(_finite_positive(r["median_ms"], r["p80_ms"], r["bytes"]) for r in rows)
    same = {r["impl"]: r["same_images"] for r in rows}
    # float64 scores must select what the float64 SVD selects, image for image
    assert same["scores/op_tokencarve"] == same["eigh/fp64_lapack"] == 2
    for r in rows:
        checked = r["impl"].startswith(("scores/", "eigh/"))
        assert (r["same_images"] is not None) == checked == (r["overlap"] is not None)
        assert not checked or (0 <= r["same_images"] <= 2 and 0 < r["overlap"] <= 1)


def test_study_eigensolvers_checks_can_fail():
    x = hidden_states(2, 40, 64, seed=1, decay=7.0).double()
    attn = attention_scores(2, 40, seed=1)
    reference = python_ref.select(attn, python_ref.info_scores_svd(x).float(), 8)
    evals, evecs = torch.linalg.eigh(study_eigensolvers.gram_torch(x))
    scores = study_eigensolvers.row_l1_torch(x, evals, evecs)
    assert study_eigensolvers.same_selection(scores, attn, 8, reference) == (2, 1.0)
    same, overlap = study_eigensolvers.same_selection(scores.flip(-1), attn, 8, reference)
    assert same < 2 and overlap < 1.0
    # the refinement step brings float32 eigenvectors of well-separated eigenvalues to float64 accuracy
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(2, 24, 24, generator=gen, dtype=torch.float64)).Q
    a = q @ torch.diag_embed(torch.linspace(1.0, 3.0, 24, dtype=torch.float64).expand(2, 24)) @ q.transpose(1, 2)
    rough_values, rough = (t.double() for t in torch.linalg.eigh(a.float()))
    lam, refined = study_eigensolvers.ogita_aishima_step(a, rough)

    def residual(v, values):
        return (a @ v - v * values[:, None, :]).abs().max().item()

    assert residual(refined, lam) < 1e-3 * residual(rough, rough_values)
    exact = torch.linalg.eigvalsh(a)
    assert (lam - exact).abs().max() < 1e-3 * (rough_values - exact).abs().max()


# ---------------------------------------------------------------------------------------------- the HF model


def test_bench_hf_tiny_model(tmp_path):
    pytest.importorskip("transformers", reason="bench_hf needs transformers")
    path = tmp_path / "hf.csv"
    rows = bench_hf.main(["--device", "cpu", "--layers", "2", "--dim", "64", "--layer", "1", "--repeats", "3",
                          "--threads", "1", "--csv", str(path)])
    n = rows[0]["prompt_tokens"]
    assert len(rows) == len(_read(path)) == 8 and rows[0]["config"] == "unpatched (sdpa)"
    for row in rows:
        # the KV cache holds the prompt carved to the budget (bench_hf raises otherwise), and is that much smaller
        assert row["carved_len"] == n - 576 + min(row["budget"], 576)
        assert row["kv_ratio"] == pytest.approx(row["carved_len"] / n)
        assert _finite_positive(row["prefill_ms"], row["p20_ms"], row["p80_ms"], row["flop_speedup"])
        assert row["p20_ms"] <= row["prefill_ms"] <= row["p80_ms"]
    with pytest.raises(AssertionError, match="KV cache holds 642 tokens, expected 194"):
        bench_hf.report([dict(rows[0], config="tokencarve T=128", budget=128, carved_len=n)], None, n, 1, 0, False)
