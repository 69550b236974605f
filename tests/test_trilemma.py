"""`report trilemma` on tiny settings: rows, counted NFE, JSON keys, the table and the figures."""

import json

from latentforge.cli import main
from latentforge.metrics.trilemma import ROW_KEYS, markdown_table
from latentforge.sampling import calls_per_step, steps_for_nfe


def steps_for(sampler: str, nfe: int) -> int:
    return steps_for_nfe(nfe, calls_per_step(sampler))


def test_steps_for_two_call_samplers():
    assert [steps_for("ddim", k) for k in (1, 2, 4)] == [1, 2, 4]
    assert [steps_for("heun", k) for k in (1, 2, 3, 4)] == [1, 1, 2, 2]


def test_report_trilemma_writes_rows_table_and_figures(tiny_digits_model, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["report", "trilemma", "--model", str(tiny_digits_model), "--ref", "digits",
            "--samplers", "ddim,heun", "--nfe", "1,4", "--n", "12", "--per-prompt", "2",
            "--out", str(out), "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(set(ROW_KEYS) <= set(r) for r in rows)
    nfe = {(r["sampler"], r["nfe_budget"]): r["nfe"] for r in rows}
    # counted calls: heun's 2 steps at a budget of 4 are 2 + 1 calls (the last is Euler)
    assert nfe == {("ddim", 1): 1, ("ddim", 4): 4, ("heun", 1): 1, ("heun", 4): 3}
    assert all(r["seconds_per_image"] > 0 and r["diversity"] is not None for r in rows)
    saved = json.loads((out / "trilemma.json").read_text())
    assert saved["rows"] == rows and saved["samplers"] == ["ddim", "heun"]
    assert (out / "trilemma.md").read_text() == markdown_table(rows)
    for name in ("fid_vs_nfe", "recall_vs_fid", "triangle"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert main([*argv[:6], "--samplers", "ddim,nope", "--out", str(out)]) == 2
    assert "unknown sampler(s) ['nope']" in capsys.readouterr().err
