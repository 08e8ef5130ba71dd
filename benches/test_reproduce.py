"""Smoke test of ``deepseek-rs reproduce --quick``: every claim of the article has its row, with a
valid verdict and everything a row must carry, and the ledger and the plots are written."""

import json
import subprocess
import sys

import pytest
from deepseek_rs.reproduce import CLAIMS, ROWS, VERDICTS
from deepseek_rs.reproduce.ledger import HOLDS, NOT_MEASURABLE, Finding, markdown

PLOTS = ("dar-work", "batching", "gvrt", "filter")  # the rows where a curve says more than a number
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_claim_has_a_row_function():
    assert [c.id for c in CLAIMS] == list(ROWS)
    assert len(CLAIMS) == 19


def test_a_finding_must_back_its_verdict():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Finding("met", "1", "m", "r")
    with pytest.raises(ValueError, match="what would measure it"):
        Finding(NOT_MEASURABLE, "-", "-", "no GPU")
    with pytest.raises(ValueError, match="a baseline beside it"):
        Finding(HOLDS, "1.0x", "m", "r", numbers={"x": 1.0})  # no baseline
    with pytest.raises(ValueError, match="a baseline beside it"):
        Finding(HOLDS, "1.0x", "m", "r", baselines=["b"])  # no number


def test_quick_ledger(tmp_path):
    out, lm = tmp_path / "out", tmp_path / "no-lm-results"
    cmd = [
        sys.executable,
        "-m",
        "deepseek_rs",
        "reproduce",
        "--quick",
        "--out",
        str(out),
        "--lm-results",
        str(lm),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.startswith("machine: "), proc.stdout
    assert "[reproduce] (1/19) dar-work" in proc.stderr  # progress on stderr
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["quick"] is True and ledger["failed"] == []
    rows = {r["id"]: r for r in ledger["rows"]}
    assert list(rows) == [c.id for c in CLAIMS]
    for rid, r in rows.items():
        assert r["verdict"] in VERDICTS, r
        for key in ("statement", "quote", "number", "measured", "method", "reason", "machine", "command"):
            assert r[key], (rid, key)
        assert r["command"] == f"deepseek-rs reproduce --only {rid} --quick"
        assert r["machine"].startswith(f"{ledger['machine_info']['cpus']} CPUs")
        assert r["seconds"] >= 0
        if r["verdict"] == NOT_MEASURABLE:
            assert r["would_measure"], r
        if r["verdict"] == HOLDS:
            assert r["baselines"] and r["numbers"], r
        if rid in PLOTS:
            assert r["plot"] == str(out / f"{rid}.png"), r
            assert (out / f"{rid}.png").read_bytes()[:8] == PNG
    # Without the reference LM's results the rows that need it say so and how to measure them.
    for rid in ("pea", "filter"):
        assert rows[rid]["verdict"] == NOT_MEASURABLE
        assert "needs the reference LM of issue 16" in rows[rid]["reason"]
        assert f"lm-experiment {rid}" in rows[rid]["would_measure"]
    # No GPU, several GPUs, or a component this project does not have: marked, with a reason.
    for rid in ("utilisation-3d", "uss-bleu", "nas", "pea-lite"):
        assert rows[rid]["verdict"] == NOT_MEASURABLE
    # The rows measured here carry their numbers and baselines.
    for rid in (
        "dar-work",
        "dar-latency",
        "lda",
        "hard-examples",
        "gvrt",
        "uss-recall",
        "uss-data",
        "qat",
        "batching",
    ):
        assert rows[rid]["verdict"] != NOT_MEASURABLE and rows[rid]["baselines"] and rows[rid]["numbers"], rid
    # QAT on digits is saturated: PTQ keeps as much, which the verdict must say.
    assert rows["qat"]["verdict"] != HOLDS
    md = (out / "ledger.md").read_text()
    assert md == markdown(ledger) or md.startswith("# The article's claims, measured")
    for rid in rows:
        assert f"## {rid}" in md


def test_only_one_row_and_a_results_file_of_the_reference_lm(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    seeds = [0, 1, 2]

    def s(values):
        return {"mean": sum(values) / len(values), "std": 0.01, "values": values}

    arms = {
        "top_k2": {"valid_perplexity": s([20.0, 20.2, 19.8])},
        "top_p": {
            "valid_perplexity": s([19.0, 19.1, 18.9]),
            "vs_top_k2": {"compute_change": s([-0.40, -0.41, -0.39]), "perplexity_change": s([-0.05] * 3)},
        },
    }
    (lm / "pea.json").write_text(json.dumps({"arms": arms, "seeds": seeds, "machine": "elsewhere"}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deepseek_rs", "reproduce", "--only", "pea", "yaml", "--out", str(out)]
    proc = subprocess.run(cmd + ["--lm-results", str(lm), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # -q: no progress
    rows = {r["id"]: r for r in json.loads((out / "ledger.json").read_text())["rows"]}
    assert list(rows) == ["pea", "yaml"]
    # One of the two figures (-35% compute) is met, the perplexity one (-12%) is not.
    assert rows["pea"]["verdict"] == "partly" and rows["pea"]["machine"] == "elsewhere"
    assert "-40.0%" in rows["pea"]["measured"]
    assert (
        rows["yaml"]["verdict"] in VERDICTS and rows["yaml"]["command"] == "deepseek-rs reproduce --only yaml"
    )
    # --only again into the same directory: that row joins the earlier ledger in the article's order
    # (a row read from a results file of another machine does not stop the merge)
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_rs", "reproduce", "--only", "nas", "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert [r["id"] for r in ledger["rows"]] == ["pea", "nas", "yaml"]
    assert ledger["command"].endswith(", then deepseek-rs reproduce --only nas"), ledger["command"]
