"""Smoke test of the attention benchmark (``python benches/bench_attention.py``) at its quick sizes."""

import pathlib
import subprocess
import sys

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

BENCH = pathlib.Path(__file__).with_name("bench_attention.py")


def test_quick_attention_benchmark_prints_every_section():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for section in (
        "== latency",
        "== quality",
        "| dense (SDPA) |",
        "| DAR, dense warm-up |",
        "| DAR, no warm-up |",
        "| own + previous + sink only |",
        "| random routed blocks |",
        "| untrained identity gate |",
        "| DAR, gate-only warm-up run sparse |",
        "| fixed blocks n-6, n-5 (no gate) |",
        "routed blocks of the second half's query blocks",
        "copied part",
        "of the pairs",
        "products computed",
        "DAR / SDPA",
    ):
        assert section in out, out


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
def test_quick_latency_with_the_flex_backend_times_the_gather_baseline():
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--section",
            "latency",
            "--backend",
            "flex",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
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
