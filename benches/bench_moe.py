"""The MoE benchmark as a script: ``python benches/bench_moe.py [--quick] [--json PATH]``.

The same code as ``deepseek-rs bench moe`` (``deepseek_rs.bench.moe``).
"""

import sys

from deepseek_rs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "moe", *sys.argv[1:]]))
