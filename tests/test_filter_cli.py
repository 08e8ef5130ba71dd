"""``deepseek-rs filter`` end to end on a corpus built here: shards in all three compressions,
bad lines, every stage, accounting, the plot, and resumption after a simulated crash."""

import gzip
import json
import random

import numpy as np
import pytest
from deepseek_rs import _core
from deepseek_rs.cli import main
from deepseek_rs.datafilter import pipeline

TOPICS = {
    "cooking": "eggs flour butter sugar oven bake dough sauce simmer garlic herbs bread salt".split(),
    "finance": "bank rates inflation bonds equities currency credit earnings investors markets loans".split(),
}
GLUE = "the a of and to in with for on while after before because which then it is was".split()
ZH = [
    "信息熵衡量文本的语义密度。",
    "低密度的文本会被过滤掉。",
    "领域筛选使用主题模型。",
    "难例挖掘依靠对比学习。",
    "模型在大规模语料上训练。",
    "数据清洗决定了最终效果。",
    "重复的段落几乎没有新信息。",
    "每篇文档都有保留或丢弃的理由。",
    "中文没有空格分词。",
    "我们把每个汉字当作一个词。",
    "过滤器同时支持压缩文件。",
    "统计结果写入一个文件。",
]


def prose(rng, topic, sentences=8):
    out = []
    for _ in range(sentences):
        words = [rng.choice(TOPICS[topic] if rng.random() < 0.5 else GLUE) for _ in range(rng.randint(8, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return "\n".join(" ".join(out[i : i + 2]) for i in range(0, len(out), 2))


def write_shard(path, lines):
    """Lines are bytes; compressed by the Rust writer according to the suffix."""
    w = _core.JsonlWriter(str(path))
    tmp = path.with_name(path.name + ".src.jsonl")
    tmp.write_bytes(b"\n".join(lines) + b"\n")
    for batch in _core.JsonlReader(str(tmp)):
        w.write(batch, np.arange(len(batch), dtype=np.int64))
    w.finish()
    tmp.unlink()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    shards, ids, bad = [], [], []
    for s, suffix in enumerate((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        lines = []
        for i in range(40):
            doc_id = f"s{s}-{i}"
            kind = i % 8
            if kind == 5:
                text = "buy cheap pills now " * 40
            elif kind == 6:
                text = "too short."
            elif kind == 7:
                picked = rng.sample(ZH, 8)
                text = "".join(picked[:4]) + "\n" + "".join(picked[4:])
            else:
                text = prose(rng, "cooking" if kind % 2 else "finance")
            lines.append(json.dumps({"id": doc_id, "text": text, "meta": {"k": kind}}).encode())
            ids.append(doc_id)
        shards.append((root / f"part{s}{suffix}", lines))
    # bad lines in the plain shard (the Rust writer would refuse them, so write it directly)
    plain, lines = shards[0]
    lines[3:3] = [b"{not json", b'{"id": "x", "text": "\xff\xfe broken utf-8"}', b'{"id": "y"}']
    bad = [(str(plain), 4), (str(plain), 5), (str(plain), 6)]
    plain.write_bytes(b"\n".join(lines) + b"\n")
    for path, lines in shards[1:]:
        write_shard(path, lines)
    ref = root / "reference.jsonl.gz"
    with gzip.open(ref, "wt") as f:
        for i in range(30):
            f.write(json.dumps({"id": f"r{i}", "text": prose(rng, "cooking")}) + "\n")
    return {"inputs": [str(p) for p, _ in shards], "ids": ids, "bad": bad, "reference": ref}


def read_out(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def outputs(out):
    kept = [d for p in sorted((out / "kept").iterdir()) for d in read_out(p)]
    dropped = [d for p in sorted((out / "dropped").iterdir()) for d in read_out(p)]
    return kept, dropped


def test_filter_cli_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["filter", *corpus["inputs"], "-o", str(out), "-q"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    kept, dropped = outputs(out)
    assert stats["read"] == len(corpus["ids"]) == len(kept) + len(dropped)
    assert stats["kept"] == len(kept) and stats["dropped"] == len(dropped)
    assert sorted(d["id"] for d in kept + dropped) == sorted(corpus["ids"])
    assert all(d["filter"]["keep"] and d["filter"]["reason"] is None for d in kept)
    assert all(not d["filter"]["keep"] and d["filter"]["reason"].startswith("density:") for d in dropped)
    assert all(d["meta"]["k"] in (5, 6) for d in dropped)  # spam and short docs, nothing else
    assert {d["meta"]["k"] for d in kept} == {0, 1, 2, 3, 4, 7}  # prose and CJK prose kept
    assert set(kept[0]["filter"]["signals"]) >= {"word_entropy", "dup_5gram_char_frac", "domain_score"}
    assert [(m["file"], m["line"]) for m in stats["malformed"]] == corpus["bad"]
    assert stats["malformed_lines"] == 3
    assert (
        sum(stats["dropped_by_reason"].values()) == stats["dropped"] == stats["dropped_by_stage"]["density"]
    )
    assert sum(stats["histograms"]["n_words"]["counts"]) == stats["read"]
    assert (out / "signals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "malformed: " in capsys.readouterr().err


def test_all_stages_with_a_config(corpus, tmp_path):
    cfg = tmp_path / "filter.yaml"
    cfg.write_text(
        f"""
density: {{thresholds: {{n_words: {{min: 20}}}}}}
domain: {{enabled: true, method: lda, reference: [{corpus["reference"]}], topics: 4, keep_quantile: 0.1}}
hard_examples: {{enabled: true, clusters: 3, keep_fraction: 0.7}}
"""
    )
    out = tmp_path / "out"
    assert main(["filter", *corpus["inputs"], "-o", str(out), "--config", str(cfg), "-q"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] + stats["dropped"] == stats["read"] == len(corpus["ids"])
    assert set(stats["dropped_by_stage"]) == {"density", "domain", "hard_examples"}
    kept, dropped = outputs(out)
    assert len(kept) == stats["kept"] and len(dropped) == stats["dropped"]
    assert all(k["filter"]["signals"]["difficulty"] is not None for k in kept)
    assert all(k["filter"]["signals"]["domain_score"] is not None for k in kept)
    hard = [d for d in dropped if d["filter"]["reason"].startswith("hard_examples:")]
    assert hard and all(d["filter"]["signals"]["difficulty"] is not None for d in hard)


def test_dsir_domain_stage(corpus, tmp_path):
    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        f"output: {{compression: zst, write_dropped: false}}\n"
        f"domain: {{enabled: true, method: dsir, reference: [{corpus['reference']}]}}\n"
    )
    out = tmp_path / "out"
    assert main(["filter", *corpus["inputs"], "-o", str(out), "--config", str(cfg), "-q"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_by_stage"]["domain"] > 0
    assert not list((out / "dropped").iterdir())
    kept = sum(len(b) for p in (out / "kept").iterdir() for b in _core.JsonlReader(str(p)))
    assert kept == stats["kept"] and stats["kept"] + stats["dropped"] == len(corpus["ids"])
    assert all(p.name.endswith(".jsonl.zst") for p in (out / "kept").iterdir())


def test_resume_after_a_crash_gives_the_same_output(corpus, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert main(["filter", *corpus["inputs"], "-o", str(clean), "-q"]) == 0

    crashed = tmp_path / "crashed"
    real_pass3 = pipeline._pass3
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_pass3(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_pass3", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        main(["filter", *corpus["inputs"], "-o", str(crashed), "-q"])
    assert not (crashed / "stats.json").exists()
    # what a hard kill leaves behind: half-written temporary files
    (crashed / "kept" / "part1.jsonl.gz.tmp").write_bytes(b"\x1f\x8b half a gzip")
    monkeypatch.setattr(pipeline, "_pass3", real_pass3)
    first_done = (crashed / ".work" / "part0.done.json").stat().st_mtime_ns
    assert main(["filter", *corpus["inputs"], "-o", str(crashed), "-q", "--keep-work"]) == 0
    assert (crashed / ".work" / "part0.done.json").stat().st_mtime_ns == first_done  # not redone
    assert outputs(crashed) == outputs(clean)
    assert not list(crashed.rglob("*.tmp"))
    assert not (clean / ".work").exists()  # removed after success unless --keep-work
    a, b = (json.loads((d / "stats.json").read_text()) for d in (clean, crashed))
    for key in ("read", "kept", "dropped", "dropped_by_reason", "malformed", "histograms"):
        assert a[key] == b[key]


def test_resume_refuses_another_configuration(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["filter", corpus["inputs"][0], "-o", str(out), "-q"]) == 0
    cfg = tmp_path / "f.yaml"
    cfg.write_text("density: {thresholds: {n_words: {min: 5}}}\n")
    assert main(["filter", corpus["inputs"][0], "-o", str(out), "--config", str(cfg), "-q"]) == 1
    assert "another configuration" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["filter", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("density: {thresholds: {n_wrds: {min: 5}}}\n")
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "a"}\n')
    assert main(["filter", str(src), "-o", str(tmp_path / "o2"), "--config", str(cfg), "-q"]) == 1
    assert "unknown signal 'n_wrds'" in capsys.readouterr().err


def test_a_truncated_single_member_shard_keeps_nothing_unverified(tmp_path, capsys):
    rng = random.Random(1)
    src = tmp_path / "t.jsonl.gz"
    with gzip.open(src, "wt") as f:
        for i in range(400):
            f.write(json.dumps({"id": i, "text": prose(rng, "finance", 12)}) + "\n")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    assert main(["filter", str(src), "-o", str(out), "-q"]) == 1  # done, but the shard was cut short
    stats = json.loads((out / "stats.json").read_text())
    # One gzip member, cut: its CRC cannot be checked, so none of it is read.
    assert stats["read"] == 0 and stats["kept"] == stats["dropped"] == 0
    (damaged,) = stats["damaged"]
    assert damaged["file"] == str(src) and damaged["offset"] == 0
    assert 0 < damaged["withheld_lines"] < 400 and stats["damaged_lines"] == damaged["withheld_lines"]
    assert stats["shards"][0]["damaged"]["offset"] == 0
    assert outputs(out) == ([], [])
    err = capsys.readouterr().err
    assert f"{src} is damaged at compressed byte 0" in err and "withheld" in err


def test_small_batches_and_an_overlong_line(tmp_path):
    rng = random.Random(2)
    src = tmp_path / "s.jsonl"
    docs = [json.dumps({"id": i, "text": prose(rng, "cooking")}) for i in range(50)]
    docs[7] = json.dumps({"id": 7, "text": "x " * 5000})
    src.write_text("\n".join(docs) + "\n")
    cfg = tmp_path / "f.yaml"
    cfg.write_text("batch_docs: 3\nmax_line_bytes: 4000\n")
    one_batch = tmp_path / "one"
    assert main(["filter", str(src), "-o", str(tmp_path / "out"), "--config", str(cfg), "-q"]) == 0
    assert main(["filter", str(src), "-o", str(one_batch), "-q"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["read"] == 49 and stats["malformed"][0]["line"] == 8
    assert "longer than 4000 bytes" in stats["malformed"][0]["error"]
    small, big = outputs(tmp_path / "out"), outputs(one_batch)
    assert [d for d in big[0] if d["id"] != 7] == small[0]  # batching changes nothing


def test_values_beyond_float64_and_array_lines(tmp_path):
    rng = random.Random(3)
    src = tmp_path / "n.jsonl"
    text = json.dumps(prose(rng, "finance"))
    src.write_text(
        f'{{"id": 1, "big": 123456789012345678901234567890, "huge": 1e400, "dec": 0.1000000000000000000001, '
        f'"text": {text}}}\n'
        f'["id", {text}]\n'
    )
    out = tmp_path / "out"
    assert main(["filter", str(src), "-o", str(out), "-q"]) == 0
    kept, dropped = outputs(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 1 and stats["malformed"][0]["error"] == "not a JSON object"
    (line,) = [ln for p in (out / "kept", out / "dropped") for f in p.iterdir() for ln in gzip.open(f, "rt")]
    assert '"big":123456789012345678901234567890,"huge":1e400,"dec":0.1000000000000000000001,' in line


def test_clashing_names_duplicates_and_outputs_inside_outdir(tmp_path, capsys):
    rng = random.Random(4)
    paths = [tmp_path / "x" / "a-2.jsonl", tmp_path / "x" / "a.jsonl", tmp_path / "y" / "a.jsonl"]
    for i, p in enumerate(paths):
        p.parent.mkdir(exist_ok=True)
        p.write_text(
            "".join(json.dumps({"id": f"{i}-{j}", "text": prose(rng, "cooking")}) + "\n" for j in range(5))
        )
    out = tmp_path / "out"
    assert main(["filter", *map(str, paths), "-o", str(out), "-q"]) == 0
    kept, dropped = outputs(out)
    assert len(kept) + len(dropped) == 15 and len(list((out / "kept").iterdir())) == 3
    assert (
        main(
            [
                "filter",
                str(paths[1]),
                str(tmp_path / "x" / ".." / "x" / "a.jsonl"),
                "-o",
                str(tmp_path / "o2"),
            ]
        )
        == 1
    )
    assert "given twice" in capsys.readouterr().err
    inside = out / "kept" / "a.jsonl.gz"
    assert main(["filter", str(inside), "-o", str(out), "-q"]) == 1
    assert "inside the output directory" in capsys.readouterr().err
    assert main(["filter", str(tmp_path / "x"), "-o", str(tmp_path / "o3"), "-q"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_writer_and_reader_do_not_deadlock_across_threads(tmp_path):
    import threading

    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": "x " * 2000}) + "\n" for _ in range(3000)))
    batches = list(_core.JsonlReader(str(src), batch_docs=100))
    writer = _core.JsonlWriter(str(tmp_path / "w.jsonl.gz"))
    reader = _core.JsonlReader(str(src), batch_docs=10)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            _ = writer.lines, reader.lines_read, reader.blank_lines

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    done = threading.Event()

    def work():
        for b in batches:
            writer.write(b, np.arange(len(b), dtype=np.int64))
        for _ in reader:
            pass
        writer.finish()
        done.set()

    w = threading.Thread(target=work, daemon=True)
    w.start()
    assert done.wait(60), "deadlock"
    stop.set()
    t.join(5)
    assert reader.lines_read == 3000
