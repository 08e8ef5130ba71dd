"""What the benchmark smoke tests share: running ``deepseek-rs bench NAME --quick`` from the
installed package, in a process of its own, and reading back the JSON it writes."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

# Benchmarks tune the expert FFN afresh in each run; choices from other runs stay out of the way.
os.environ.setdefault("DEEPSEEK_RS_CACHE_DIR", tempfile.mkdtemp(prefix="deepseek-rs-tuning-"))


@pytest.fixture
def run_bench(tmp_path):
    """``run_bench(name, *options, json_out=True, timeout=300, check=True)``: the completed process of
    ``python -m deepseek_rs bench NAME --quick OPTIONS`` (exit status checked) and, with ``json``,
    the document it wrote with ``--json``."""

    def run(name, *options, json_out=True, timeout=300, check=True):
        path = tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "deepseek_rs", "bench", name, "--quick", *options]
        if json_out:
            cmd += ["--json", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        data = json.loads(path.read_text()) if json_out and proc.returncode == 0 else None
        return proc, data

    return run
