"""`make demo`: the table and the picture it promises."""

from tokencarve_kernels import demo


def test_demo_prints_table_and_writes_png(tmp_path, capsys):
    png = tmp_path / "grid.png"
    rows = demo.main(["--png", str(png), "--repeats", "1", "--no-llava"])  # the LLaVA section: test_hf.py
    out = capsys.readouterr().out
    assert [r["budget"] for r in rows] == [192, 128, 64]
    for row in rows:
        assert row["kept"] == row["budget"]
        assert row["kept"] + row["merged"] == min(int(1.5 * row["budget"]), 576)
        assert row["kept"] + row["merged"] + row["dropped"] == 576
        assert row["kv_saved_mib"] == (576 - row["budget"]) * 0.5  # 512 KiB per token for LLaVA-1.5-7B
    assert "authors SVD ms" in out and out.count("\n") > 24
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data[-12:]
