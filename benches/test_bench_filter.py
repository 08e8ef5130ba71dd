"""Smoke test of ``deepseek-rs bench filter --quick`` (a 0.3 MB corpus of the machine's own
text): the plain-Python baseline computes what the Rust signals compute, and the end-to-end run
accounts for every document, agreeing with stage 1 in memory."""

import importlib.util


def test_quick_filter_benchmark_accounts_for_every_document(run_bench):
    proc, data = run_bench("filter")
    assert proc.stdout.startswith("machine: ") and "signals" in proc.stdout, proc.stdout
    docs = data["documents"]
    assert docs > 0 and data["mb"] >= 0.3  # the corpus is filled up to --mb (0.3 MB when quick)
    # The speed ratio only means something if the baseline computes the same 30 signals: equal
    # (relative 1e-9, as the property tests compare them) on every document.
    assert data["signals"]["documents_agreeing"] == docs
    assert data["signals"]["ratio"] > 0
    stage1, e2e = data["stage1"], data["end_to_end"]
    # Accounting: every document read is kept or dropped, each drop has one reason, nothing is
    # malformed (the shards are written by the benchmark itself).
    assert e2e["read"] == docs and e2e["malformed_lines"] == 0
    assert e2e["kept"] + e2e["dropped"] == docs
    assert sum(e2e["dropped_by_reason"].values()) == e2e["dropped"]
    assert sum(stage1["dropped_by_reason"].values()) == docs - stage1["kept"]
    # `deepseek-rs filter`'s default configuration is stage 1 alone: the same decisions as the
    # DensityFilter in memory, reason by reason.
    assert e2e["kept"] == stage1["kept"]
    assert e2e["dropped_by_reason"] == {f"density:{r}": n for r, n in stage1["dropped_by_reason"].items()}
    # Real text of both kinds: READMEs and docstrings pass, short notices and changelogs do not.
    assert 0 < e2e["kept"] < docs
    if importlib.util.find_spec("datatrove") is None:
        assert "pip install 'deepseek-rs[bench-filter]'" in stage1["datatrove"]
    else:
        # Gopher rules in two tokenisations (spaCy words, whitespace words): mostly the same calls.
        assert stage1["agreement"] >= 0.8
