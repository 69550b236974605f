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


def test_shapes_prompt_scorer_reads_captions_of_the_dataset():
    """The shapes wing's scorer (registered for `shapes` reference sets): the dataset's own
    images against their captions score near 1, against another image's captions far lower."""
    import torch

    from latentforge.data import load_dataset
    from latentforge.metrics.fid_eval import prompt_accuracy

    ds = load_dataset("shapes:64", seed=3)
    items = [ds[i] for i in range(24)]
    images = torch.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    own = prompt_accuracy("shapes:64", images, captions)
    shifted = prompt_accuracy("shapes:64", images, captions[1:] + captions[:1])
    assert own >= 0.9 and shifted <= 0.3
    # no scorer for the data kind, or no captions: no column value rather than a made-up one
    assert prompt_accuracy("digits", images, captions) is None
    assert prompt_accuracy("shapes:64", images, [None] * 24) is None


def test_prompt_accuracy_column_only_for_text_models(tiny_digits_model, tmp_path, capsys):
    argv = ["report", "trilemma", "--model", str(tiny_digits_model), "--ref", "digits",
            "--samplers", "ddim", "--nfe", "1", "--n", "8", "--per-prompt", "0",
            "--out", str(tmp_path), "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["prompt_accuracy"] is None
    assert "| - | " in markdown_table([row])
