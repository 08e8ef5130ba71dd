"""The Rust signals against the plain-Python reference (deepseek_rs.bench.filter_reference), and the
JSONL reader on bad bytes."""

import gzip
import json
import math

import numpy as np
import pytest
from deepseek_rs import ShardError, _core
from deepseek_rs.bench.filter_reference import signals as reference_signals
from deepseek_rs.datafilter import SIGNAL_NAMES, compute_signals
from hypothesis import example, given
from hypothesis import strategies as st

# Python 3.11 knows Unicode 14; code points assigned later are category Cn here but letters or
# marks in the Rust tables (Unicode 16), so the reference can only judge assigned characters.
any_char = st.characters(exclude_categories=("Cs", "Cn"))
fragments = st.sampled_from(
    [
        "\n",
        "\n\n",
        " \n \n",
        "\r\n",
        "...",
        "\u2026",
        "#",
        "- ",
        "• ",
        "。",
        "模型",
        "数据很好",
        "カタカナ",
        "한국어",
        "😀",
        "👩‍👩‍👧",
        "e\u0301",
        "\u3000",
        "\x1c",
        "\u00a0",
        "Ⅻ",
        "١٢٣",
        "the same words again",
    ]
)
texts = st.lists(
    st.one_of(st.text(any_char, max_size=30), fragments, st.text(alphabet="ab .\n#", max_size=60)),
    max_size=15,
).map("".join)


def assert_matches_reference(text):
    got = compute_signals([text])[0]
    want = reference_signals(text)
    assert list(want) == list(SIGNAL_NAMES)
    for name, g in zip(SIGNAL_NAMES, got):
        w = want[name]
        assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12), (name, g, w, text)


@given(texts)
@example("")
@example("   \n\t  \n")
@example("a b\na b\n\nc d e")
@example("DeepSeek模型，很好。\n模型很好。\n\n# 标题 ... 😀")
@example("word " * 5000)
@example("x" * 100_000)
def test_every_signal_matches_the_python_reference(text):
    assert_matches_reference(text)


@given(st.lists(st.sampled_from(["alpha", "beta", "gamma", "模", "型", "\n", "\n\n"]), max_size=300))
def test_repetitive_texts_match_the_reference(words):
    assert_matches_reference(" ".join(words))


def test_duplicate_ngram_fractions_count_only_the_repeats():
    # Three copies of a 5-word block of 9 word characters, then one word: 29 word characters.
    # 5-grams: the block at word 5 repeats the one at word 0 (9 characters); the scan jumps to
    # word 10, where the block repeats again (9). 6-grams: the window at word 5 repeats the one
    # at word 0 (9 + 2 characters), and no window after word 10 repeats an earlier one.
    text = "aa b ccc d ee aa b ccc d ee aa b ccc d ee zz"
    got = dict(zip(SIGNAL_NAMES, compute_signals([text])[0]))
    want = dict(zip(range(5, 11), (18, 11, 12, 15, 16, 18)))
    for n, chars in want.items():
        assert got[f"dup_{n}gram_char_frac"] == chars / 29
        assert reference_signals(text)[f"dup_{n}gram_char_frac"] == chars / 29


# Words of one length, so datatrove's n-grams (the words joined without a separator) are the
# same as ours (word tuples).
@given(st.lists(st.sampled_from(["ab", "cd", "ef", "gh"]), max_size=200))
def test_duplicate_ngram_characters_match_datatrove(words):
    datatrove = pytest.importorskip("datatrove.pipeline.filters.gopher_repetition_filter")
    got = dict(zip(SIGNAL_NAMES, compute_signals([" ".join(words)])[0]))
    for n in range(5, 11):
        want = datatrove.find_all_duplicate(words, n)
        assert math.isclose(got[f"dup_{n}gram_char_frac"] * 2 * len(words), want, abs_tol=1e-9)


def test_hashes_and_ellipses_are_separate_ratios():
    got = dict(zip(SIGNAL_NAMES, compute_signals(["# a ## b ... c\u2026 d e"])[0]))
    assert got["hash_word_ratio"] == 3 / 8 and got["ellipsis_word_ratio"] == 2 / 8
    assert "symbol_word_ratio" not in got


def test_batch_rows_are_the_documents_in_order():
    docs = ["one two three", "", "模型 模型", "a\n\na"]
    batch = compute_signals(docs)
    assert batch.shape == (4, len(SIGNAL_NAMES)) and batch.dtype == np.float64
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(batch[i], compute_signals([d])[0])
    assert compute_signals([]).shape == (0, len(SIGNAL_NAMES))


def test_a_str_is_not_a_list_of_texts():
    with pytest.raises(TypeError):
        _core.compute_signals("abc")


@given(st.lists(st.one_of(texts, st.binary(max_size=40)), max_size=20))
def test_reader_reports_every_bad_line_and_keeps_the_rest(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("r") / "x.jsonl.gz"
    lines, want_docs, want_bad = [], [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            line = json.dumps({"id": i, "text": item}).encode()
            want_docs.append((len(lines) + 1, item))
        else:
            line = item.replace(b"\n", b" ").replace(b"\r", b" ")
            if not line.strip(b" \t\x0c"):  # Rust's ASCII whitespace
                continue  # blank lines are skipped, not errors
            want_bad.append(len(lines) + 1)
        lines.append(line)
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines))
    docs, bad = [], []
    for batch in _core.JsonlReader(str(path), batch_docs=3):
        docs.extend(zip(batch.line_numbers.tolist(), batch.texts))
        bad.extend(line for line, _ in batch.errors)
    # Every JSON line comes back (a random binary line could, in principle, be a document too).
    assert [d for d in docs if d in want_docs] == want_docs
    doc_lines = [n for n, _ in docs]
    assert not set(bad) & set(doc_lines)
    assert sorted(bad + doc_lines) == sorted(want_bad + [n for n, _ in want_docs])


def test_invalid_utf8_and_missing_text_are_reported_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n{"id": 3}\n[1, 2]\n{"text": "fine"}\n')
    errors, texts = [], []
    for batch in _core.JsonlReader(str(path)):
        errors.extend(batch.errors)
        texts.extend(batch.texts)
    assert texts == ["ok", "fine"]
    assert [line for line, _ in errors] == [2, 3, 4]
    assert "UTF-8" in errors[0][1] and "text" in errors[1][1]


def test_missing_and_corrupt_files_raise_shard_error(tmp_path):
    with pytest.raises(ShardError, match="no-such"):
        _core.JsonlReader(str(tmp_path / "no-such.jsonl"))
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(b"definitely not zstd")
    with pytest.raises(ShardError):
        list(_core.JsonlReader(str(path)))
    assert issubclass(ShardError, OSError)


def test_reader_limits_are_checked(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError):
        _core.JsonlReader(str(path), batch_docs=0)
