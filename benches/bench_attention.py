"""The attention benchmark as a script: ``python benches/bench_attention.py [--quick] [--section ...]``.

The same code as ``deepseek-rs bench attention`` (``deepseek_rs.bench.attention``).
"""

import sys

from deepseek_rs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
