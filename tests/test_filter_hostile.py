"""Hostile input for the JSONL reader: random bytes, damaged and truncated compressed shards.
None may crash, hang, or give a document that is not a line of the input. The CI profile runs a
few dozen cases per target; DEEPSEEK_RS_LONG=1 runs 10,000 each (pytest -m slow)."""

import gzip
import json
import os

import numpy as np
import pytest
from deepseek_rs import ShardError, _core
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

LONG = os.environ.get("DEEPSEEK_RS_LONG") == "1"
CAMPAIGN = settings(
    max_examples=10_000 if LONG else 40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def read(path, **limits):
    """Every document and bad line, and the error that ended the shard (None if it ended well)."""
    reader = _core.JsonlReader(str(path), **limits)
    docs, bad, error = [], [], None
    try:
        for batch in reader:
            docs += [(n, t) for n, t in zip(batch.line_numbers.tolist(), batch.texts)]
            bad += batch.errors
    except ShardError as e:
        error = e
    return reader, docs, bad, error


line = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda t: json.dumps({"text": t}).encode(), st.text(max_size=20)),
    st.builds(
        lambda t, i: json.dumps({"id": i, "text": t}, ensure_ascii=False).encode(),
        st.text(max_size=20),
        st.integers(),
    ),
    st.sampled_from([b"{", b'{"text": 1}', b"[1]", b'{"text": "\\ud800"}', b"\xff\xfe", b"  ", b"\r"]),
    st.just(b"{}" * 30),
)


@CAMPAIGN
@given(lines=st.lists(line, max_size=12), sep=st.sampled_from([b"\n", b"\r\n"]), tail=st.booleans())
def test_plain_jsonl_campaign(tmp_path_factory, lines, sep, tail):
    raw = sep.join(lines) + (sep if tail else b"")
    path = tmp_path_factory.mktemp("p") / "x.jsonl"
    path.write_bytes(raw)
    reader, docs, bad, error = read(path, batch_docs=3, max_line_bytes=64)
    assert error is None and reader.damage is None
    split = raw.split(b"\n")
    if split and split[-1] == b"":
        split.pop()
    assert reader.lines_read == len(split) == len(docs) + len(bad) + reader.blank_lines
    for n, text in docs:  # a document is exactly what its line says
        assert json.loads(split[n - 1].rstrip(b"\r"))["text"] == text


def _compress(kind, data, tmp):
    if kind == "gz":
        return gzip.compress(data, mtime=0)
    plain, z = tmp / "c.jsonl", tmp / "c.jsonl.zst"
    plain.write_bytes(data)
    w = _core.JsonlWriter(str(z))
    for batch in _core.JsonlReader(str(plain)):
        w.write(batch, np.arange(len(batch), dtype=np.int64))
    w.finish()
    return z.read_bytes()


@CAMPAIGN
@given(
    kind=st.sampled_from(["gz", "zst"]),
    members=st.integers(1, 4),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3),
    cut=st.none() | st.floats(0, 1),
    noise=st.none() | st.binary(min_size=1, max_size=64),
)
def test_compressed_damage_campaign(tmp_path_factory, kind, members, flips, cut, noise):
    tmp = tmp_path_factory.mktemp("z")
    lines = [json.dumps({"id": i, "text": f"document {i} " * (i % 5 + 1)}).encode() for i in range(24)]
    per = -(-len(lines) // members)
    data = b"".join(
        _compress(kind, b"".join(ln + b"\n" for ln in lines[i : i + per]), tmp) for i in range(0, 24, per)
    )
    data = bytearray(data)
    for at, x in flips:
        data[int(at * len(data))] ^= x
    if cut is not None:
        del data[int(cut * len(data)) :]
    if noise is not None:
        data += noise
    path = tmp / f"x.jsonl.{kind}"
    path.write_bytes(bytes(data))
    reader, docs, bad, error = read(path, batch_docs=5)
    # Only whole, unaltered documents of the input, in order, and never a bad line from damage.
    assert [t for _, t in docs] == [json.loads(ln)["text"] for ln in lines[: len(docs)]]
    assert not bad
    assert (error is None) == (reader.damage is None)
    if error is not None:
        assert "withheld" in str(error) and str(reader.damage["offset"]) in str(error)
    else:
        assert len(docs) == 24


@CAMPAIGN
@given(kind=st.sampled_from(["gz", "zst", "jsonl"]), raw=st.binary(max_size=200))
def test_random_bytes_campaign(tmp_path_factory, kind, raw):
    path = tmp_path_factory.mktemp("b") / f"x.{kind}"
    path.write_bytes(raw)
    reader, docs, bad, error = read(path, batch_docs=4, max_line_bytes=100)
    if kind != "jsonl":
        assert (error is None) == (reader.damage is None)
        if error is None:  # random bytes that decompress and verify: vanishingly rare
            assert raw[:2] in (b"\x1f\x8b", b"\x28\xb5")
    else:
        assert error is None


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_large_line_in_a_damaged_member_is_never_held(tmp_path, kind):
    big = json.dumps({"text": "x" * 300_000}).encode()
    data = bytearray(_compress(kind, big + b"\n", tmp_path))
    data[len(data) // 2] ^= 1
    path = tmp_path / f"big.jsonl.{kind}"
    path.write_bytes(bytes(data))
    reader, docs, bad, error = read(path, max_line_bytes=1000)
    assert docs == [] and bad == [] and error is not None
