"""Nothing lost, nothing altered: a damaged compressed shard never puts an altered document in
kept/ or dropped/, and a filter run killed (SIGKILL) at any moment finishes, when the same
command is run again, with the output of an uninterrupted run."""

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from deepseek_rs import _core
from deepseek_rs.cli import main
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

WORDS = "the a of and to in with bank rates bonds credit eggs flour butter oven bake dough sauce".split()


def doc_lines(seed, n):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        text = ". ".join(words[j : j + 70].capitalize() for j in range(0, len(words), 70)) + "."
        out.append(json.dumps({"id": f"{seed}-{i}", "text": text, "n": i}).encode())
    return out


def gzip_members(lines, per):
    """The lines as concatenated gzip members of ``per`` lines; and where each member starts."""
    buf, starts = io.BytesIO(), []
    for i in range(0, len(lines), per):
        starts.append(buf.tell())
        buf.write(gzip.compress(b"".join(line + b"\n" for line in lines[i : i + per]), mtime=0))
    return buf.getvalue(), starts


def zstd_frames(lines, per, tmp):
    """The lines as concatenated zstd frames (with checksums, by the Rust writer) of ``per`` lines."""
    out, starts = b"", []
    for i in range(0, len(lines), per):
        starts.append(len(out))
        plain, frame = tmp / "frame.jsonl", tmp / "frame.jsonl.zst"
        plain.write_bytes(b"".join(line + b"\n" for line in lines[i : i + per]))
        w = _core.JsonlWriter(str(frame))
        for batch in _core.JsonlReader(str(plain)):
            w.write(batch, np.arange(len(batch), dtype=np.int64))
        w.finish()
        out += frame.read_bytes()
        plain.unlink()
        frame.unlink()
    return out, starts


def written(out):
    """Every line of kept/ and dropped/ (gzip), decompressed, as bytes."""
    lines = []
    for sub in ("kept", "dropped"):
        for p in sorted((out / sub).iterdir()):
            lines += gzip.decompress(p.read_bytes()).splitlines()
    return lines


RAW = "output: {annotate: false, plot: false}\n"  # documents written exactly as read
LONG = os.environ.get("DEEPSEEK_RS_LONG") == "1"  # the long campaigns: DEEPSEEK_RS_LONG=1 pytest -m slow


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_damaged_member_keeps_exactly_the_verified_documents(tmp_path, capsys, kind):
    lines = doc_lines(1, 120)
    data, starts = gzip_members(lines, 12) if kind == "gz" else zstd_frames(lines, 12, tmp_path)
    data = bytearray(data)
    data[(starts[4] + starts[5]) // 2] ^= 0x5A  # inside the fifth member/frame
    src = tmp_path / f"d.jsonl.{kind}"
    src.write_bytes(bytes(data))
    cfg = tmp_path / "f.yaml"
    cfg.write_text(RAW)
    out = tmp_path / "out"
    assert main(["filter", str(src), "-o", str(out), "--config", str(cfg), "-q"]) == 1
    got = written(out)
    # Every document written is one of the input's lines, byte for byte, and they are exactly
    # the documents of the four members before the damage: nothing altered, nothing verified lost.
    assert sorted(got) == sorted(lines[:48])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 48 == stats["kept"] + stats["dropped"]
    (d,) = stats["damaged"]
    assert d["offset"] == starts[4] and d["withheld_lines"] <= 72 and d["file"] == str(src)
    err = capsys.readouterr().err
    assert f"damaged at compressed byte {starts[4]}" in err and "withheld" in err


def test_trailing_garbage_is_damage_but_keeps_every_document(tmp_path):
    lines = doc_lines(2, 30)
    data, _ = gzip_members(lines, 10)
    src = tmp_path / "g.jsonl.gz"
    src.write_bytes(data + b"\x00" * 100)
    out = tmp_path / "out"
    cfg = tmp_path / "f.yaml"
    cfg.write_text(RAW)
    assert main(["filter", str(src), "-o", str(out), "--config", str(cfg), "-q"]) == 1
    assert sorted(written(out)) == sorted(lines)
    (d,) = json.loads((out / "stats.json").read_text())["damaged"]
    assert (d["offset"], d["withheld_lines"]) == (len(data), 0)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.generate],
)
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3),
    cut=st.none() | st.floats(0, 1),
    kind=st.sampled_from(["gz", "zst"]),
)
def test_random_damage_never_writes_an_altered_document(tmp_path_factory, flips, cut, kind):
    tmp = tmp_path_factory.mktemp("r")
    lines = doc_lines(3, 40)
    data, _ = gzip_members(lines, 5) if kind == "gz" else zstd_frames(lines, 5, tmp)
    data = bytearray(data)
    for at, x in flips:
        data[int(at * len(data))] ^= x
    if cut is not None:
        del data[int(cut * len(data)) :]
    src = tmp / f"r.jsonl.{kind}"
    src.write_bytes(bytes(data))
    (tmp / "f.yaml").write_text(RAW)
    code = main(["filter", str(src), "-o", str(tmp / "out"), "--config", str(tmp / "f.yaml"), "-q"])
    got = written(tmp / "out")
    assert sorted(got) == sorted(lines[: len(got)])  # a prefix of the input's documents, unaltered
    stats = json.loads((tmp / "out" / "stats.json").read_text())
    assert code == (1 if stats["damaged"] else 0)
    if not stats["damaged"]:
        assert len(got) == 40


# --- SIGKILL at any moment, then the same command again --------------------------------------------


def _corpus(root, plot=True):
    root.mkdir()
    a, b, c, d = (doc_lines(s, n) for s, n in ((10, 150), (11, 120), (12, 90), (13, 60)))
    b[5] = b"{broken json"
    (root / "a.jsonl").write_bytes(b"\n".join(a) + b"\n")
    (root / "b.jsonl.gz").write_bytes(gzip_members(b, 25)[0])
    (root / "c.jsonl.zst").write_bytes(zstd_frames(c, 30, root)[0])
    damaged, starts = gzip_members(d, 10)
    damaged = bytearray(damaged)
    damaged[starts[4] + 20] ^= 0xFF
    (root / "d.jsonl.gz").write_bytes(bytes(damaged))
    cfg = root / "f.yaml"
    cfg.write_text(
        f"batch_docs: 16\noutput: {{plot: {str(plot).lower()}}}\n"
        "hard_examples: {enabled: true, clusters: 4, keep_fraction: 0.8}\n"
    )
    return [str(root / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.jsonl.gz")], str(cfg)


def _command(inputs, cfg, out):
    return [sys.executable, "-m", "deepseek_rs.cli", "filter", *inputs, "-o", str(out), "--config", cfg, "-q"]


def _snapshot(out):
    files = {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("stats.json", "signals.png")
    }
    stats = json.loads((out / "stats.json").read_text())
    for key in ("seconds", "plot_seconds", "plot"):
        stats.pop(key, None)
    return files, stats


def _run_killed(cmd, when, timeout=60):
    """Start ``cmd``; SIGKILL it once ``when()`` is true. True if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return True
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return False


def _kill_points(long):
    """Files whose appearance triggers the kill: each phase of the run (pass 1 per shard, stage 3,
    pass 3 per shard, the stats, removing .work), then random delays."""
    points = [
        ".work/config.json",
        ".work/a.meta.json",
        ".work/b.signals.f8.tmp",
        ".work/c.meta.json",
        ".work/hard_examples.npz",
        ".work/a.done.json",
        "kept/c.jsonl.gz.tmp",
        ".work/d.done.json",
        "stats.json",
        ".work.removing",
    ]
    return points if long else [points[2], points[6]]


LONG_ONLY = [pytest.mark.slow, pytest.mark.skipif(not LONG, reason="long run: set DEEPSEEK_RS_LONG=1")]


@pytest.mark.parametrize("long", [False, pytest.param(True, marks=LONG_ONLY)], ids=["ci", "long"])
def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_output(tmp_path, long):
    inputs, cfg = _corpus(tmp_path / "in", plot=long)  # drawing the plot takes seconds
    clean = tmp_path / "clean"
    assert subprocess.run(_command(inputs, cfg, clean), capture_output=True).returncode == 1  # d is damaged
    want = _snapshot(clean)
    assert not (clean / ".work").exists() and not list(clean.rglob("*.tmp*"))
    assert want[1]["damaged"][0]["file"].endswith("d.jsonl.gz") and want[1]["read"] > 300

    killed = 0
    for i, point in enumerate(_kill_points(long)):
        out = tmp_path / f"k{i}"
        killed += _run_killed(_command(inputs, cfg, out), lambda p=out / point: p.exists())
        assert subprocess.run(_command(inputs, cfg, out), capture_output=True).returncode == 1
        assert _snapshot(out) == want, point
        assert not (out / ".work").exists() and not (out / ".work.removing").exists()
        assert not list(out.rglob("*.tmp*")), point
    # Killed several times in a row at random moments, resuming each time.
    rng = random.Random(7)
    chain = tmp_path / "chain"
    for _ in range(6 if long else 1):
        start = time.monotonic()
        delay = rng.uniform(0.05, 2.0)
        killed += _run_killed(_command(inputs, cfg, chain), lambda s=start, d=delay: time.monotonic() - s > d)
    assert subprocess.run(_command(inputs, cfg, chain), capture_output=True).returncode == 1
    assert _snapshot(chain) == want
    assert killed >= len(_kill_points(long)) // 2  # most kill points were reached before the end


def test_work_is_removed_after_success_unless_kept(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"\n".join(doc_lines(4, 20)) + b"\n")
    assert main(["filter", str(src), "-o", str(tmp_path / "o1"), "-q"]) == 0
    names = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert names == ["dropped", "kept", "signals.png", "stats.json"]
    assert main(["filter", str(src), "-o", str(tmp_path / "o2"), "-q", "--keep-work"]) == 0
    assert (tmp_path / "o2" / ".work" / "a.meta.json").exists()
    # The finished run's stats still guard the directory against another configuration.
    cfg = tmp_path / "f.yaml"
    cfg.write_text("density: {enabled: false}\n")
    assert main(["filter", str(src), "-o", str(tmp_path / "o1"), "--config", str(cfg), "-q"]) == 1
    assert main(["filter", str(src), "-o", str(tmp_path / "o1"), "-q"]) == 0  # the same run again is fine
