"""Smoke test of ``deepseek-rs bench attention --quick --json PATH`` (latency at 256 and 512
tokens; the quality models trained 2 + 4 steps on 512-byte windows), and unit tests of its pieces."""

import re

import pytest
import torch
from deepseek_rs import DynamicAttention
from deepseek_rs.bench.attention import (
    CopyTask,
    RandomGate,
    build,
    describe_routing,
    language_model,
    routed_offsets,
    warm_up_gates,
    words,
)

SUMMARY = re.compile(
    r"^(?P<name>[^\n]+?): (?P<work>[\d.]+)% of the attention work \(score products\) and "
    r"(?P<pairs>[\d.]+)% of the pairs skipped at 512 tokens; (?P<acc>[\d.]+)% of the dense accuracy, "
    r"(?P<copy>[\d.]+)% on the copied part$",
    re.MULTILINE,
)
# At 512 tokens (8 blocks of 64), a query block attends its own block, the previous one, the sink
# and 2 routed blocks: whichever blocks the gate routes to, 18.7% of the causal (query, key)
# pairs are skipped; 46.8% with the forced blocks alone.
PAIRS_SKIPPED = {"own + previous + sink only": 46.8}
DAR_PAIRS_SKIPPED = 18.7


def test_quick_attention_benchmark_keeps_the_dense_accuracy(run_bench):
    proc, data = run_bench("attention", "--threads", "1")
    out = proc.stdout
    assert out.startswith("machine: ") and "== latency" in out and "== quality" in out, out
    assert re.search(r"^\| 512 \| 81\.3% \|", out, re.MULTILINE), out  # = 100% - 18.7%: see PAIRS_SKIPPED
    rows = {m["name"]: m for m in SUMMARY.finditer(out)}
    assert set(rows) == {
        "DAR, dense warm-up",
        "DAR, no warm-up",
        "DAR, gate-only warm-up run sparse",
        "own + previous + sink only",
        "random routed blocks",
        "untrained identity gate",
        "fixed blocks n-6, n-5 (no gate)",
    }, out
    for name, m in rows.items():
        assert float(m["pairs"]) == pytest.approx(PAIRS_SKIPPED.get(name, DAR_PAIRS_SKIPPED), abs=0.05), name
        # After 2 + 4 steps every model predicts mostly byte frequencies, which any attention
        # pattern learns alike (98-100% seen): a sparse model 10% off the dense one computes
        # something else than attention over its selected blocks.
        assert 90.0 <= float(m["acc"]) <= 110.0, (name, m["acc"])
        assert 85.0 <= float(m["copy"]) <= 115.0, (name, m["copy"])
    for section in ("| dense (SDPA) |", "routed blocks of the second half's query blocks", "DAR / SDPA"):
        assert section in out, out

    # The JSON holds the same figures: the machine, the latency rows, the quality rows per model.
    assert data["quick"] is True and data["machine"]["cpus"] and data["machine"]["torch_threads"] == 1
    assert [r["tokens"] for r in data["latency"]["rows"]] == [256, 512]
    (at_512,) = [r for r in data["latency"]["rows"] if r["tokens"] == 512]
    assert at_512["pairs_attended"] == pytest.approx(1 - DAR_PAIRS_SKIPPED / 100, abs=5e-4)
    assert at_512["dar_over_sdpa"] == pytest.approx(at_512["dar_s"] / at_512["sdpa_s"])
    quality = data["quality"]
    assert quality["seeds"] == [0] and quality["tokens"] == 512
    by_name = {r["model"]: r for r in quality["rows"]}
    assert set(by_name) == set(rows) | {"dense (SDPA)", "pre-trained dense checkpoint"}
    for name, m in rows.items():
        r = by_name[name]
        assert r["seed"] == 0 and r["lm_steps"] == 4
        assert 100 * r["pairs_skipped"] == pytest.approx(float(m["pairs"]), abs=0.05), name
        assert 100 * r["accuracy_of_dense"] == pytest.approx(float(m["acc"]), abs=0.005), name
        assert r["pairs"] == pytest.approx(1 - r["pairs_skipped"]) and len(r["routing"]) == 1, name
    assert by_name["dense (SDPA)"]["pairs"] == 1.0 and by_name["dense (SDPA)"]["routing"] == []


def test_copy_task_sources_lie_beyond_the_local_and_sink_blocks():
    seq, bs = 1024, 64
    task = CopyTask(seq, bs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, seq), generator=gen)
    y, dist = task.apply(x, gen)
    assert torch.equal(y[:, : task.start], x[:, : task.start])
    for row, d in zip(y, dist.tolist()):
        for i in range(task.start, seq):  # the byte at i repeats the byte at i - d
            assert row[i] == row[i - d]
            assert (i - d) // bs not in (0, i // bs, i // bs - 1)  # not in the sink, own or previous block
    assert len(set(dist.tolist())) > 10 and min(dist.tolist()) >= 256
    copied = task.copied_targets(seq)  # targets are bytes 1..seq-1
    assert copied.sum() == seq - task.start - 1 and not copied[task.start - 1] and copied[task.start]


@pytest.mark.slow
def test_quick_latency_with_the_flex_backend_times_the_gather_baseline(run_bench):
    proc, _ = run_bench(
        "attention",
        "--section",
        "latency",
        "--backend",
        "flex",
        "--threads",
        "1",
        json_out=False,
        timeout=600,
    )
    out = proc.stdout
    assert "backend='flex'" in out and "flex / gather" in out, out
    assert out.count("\n| 256 |") == 1 and out.count("\n| 512 |") == 1, out


def test_word_tokens_keep_frequent_pieces_and_map_the_rest_to_unknown():
    text = torch.tensor(list(b"the cat, the dog.\n  the cat"))
    train, val = words(text, torch.tensor(list(b"the bird")), vocab=4)
    # pieces: "the" " cat" "," " the" " dog" "." "\n  " "the" " cat"; the 3 most frequent get ids 1..3
    assert train.tolist()[:2] == [1, 2] and train.tolist()[-2:] == [1, 2]
    assert int(train.max()) == 3 and (train == 0).sum() == 4  # "," (first of the ties) got id 3
    assert val.tolist() == [1, 0]


def test_warm_up_trains_only_the_gates_with_every_block_attended():
    base = language_model(0, 512, 64, 1)
    model = build("dar", 0, base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    warm_up_gates(model, data, 2, 2, 512, lr=1e-2, seed=0, task=None)  # 8 blocks: 5 routable
    for n, p in model.named_parameters():
        assert p.requires_grad
        assert torch.equal(p, before[n]) != (".gate." in n), n  # gates moved, nothing else did
    assert not any(getattr(m, "warmup", False) for m in model.modules())


def test_random_gate_draws_another_pattern_in_every_layer():
    model = build("random", 0, language_model(0, 512, 64, 2))
    gates = [m for m in model.modules() if isinstance(m, RandomGate)]
    assert len(gates) == 2
    qp, kp = torch.zeros(1, 1, 8, 64), torch.zeros(1, 1, 8, 64)
    assert not torch.equal(gates[0](qp, kp), gates[1](qp, kp))


def test_offset_gate_routes_blocks_five_and_six_back_and_routing_is_described():
    model = build("offset", 0, language_model(0, 1024, 64, 1)).eval()
    x = torch.randint(0, 256, (2, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    (dar,) = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    counts = routed_offsets(dar, 1024)
    assert {n for n, _ in counts} == set(range(8, 16))  # the second half's query blocks
    assert set(offsets for _, offsets in counts) == {(5, 6)}
    assert describe_routing(counts).startswith("blocks n-5, n-6 in 100.0%; differs")
    assert describe_routing(counts).endswith("in 0.0%")
