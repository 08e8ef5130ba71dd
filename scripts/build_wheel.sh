#!/usr/bin/env bash
# The release wheel for Linux x86_64, built and checked the way a user installs it:
#
#     bash scripts/build_wheel.sh
#
# 1. build: `maturin build --release --zig --compatibility manylinux_2_28` into dist/. zig links
#    against glibc 2.28 whatever the build machine's glibc, so the wheel installs on Ubuntu 20.04,
#    RHEL/Rocky 8, Debian 11 and newer (a plain `maturin build` gets this machine's glibc tag,
#    e.g. manylinux_2_34, which pip refuses on older systems). maturin, ziglang and auditwheel
#    come from PyPI into a tools venv (target/wheel-tools/venv-build), installed only if missing.
# 2. check the wheel: `auditwheel show` agrees with its manylinux_2_28 abi3 tag; it installs only
#    `deepseek_rs` (no top-level `cuda`, a name that belongs to NVIDIA's bindings) and ships
#    py.typed, _core.pyi, data/optimization.yaml, the CUDA sources and the LICENSE.
# 3. smoke test, for each CPython of SMOKE_PYTHONS: a fresh venv, `pip install` of the wheel with
#    its dependencies from PyPI (torch included), then from outside the source tree: import,
#    `deepseek-rs --version` and `--help`, _core routing on numpy, and a PEAMoE forward/backward.
#
# Environment:
#   PYTHON         interpreter for the tools venv (default: python3)
#   SMOKE_PYTHONS  CPython versions to smoke-test (default: "3.9 3.13"); each is found as
#                  pythonX.Y on PATH or under $(pyenv root)/versions, and skipped if absent
#                  (at least one must be found)
#   SMOKE_TORCH    0: torch-free smoke (install the wheel with --no-deps plus numpy, pyyaml,
#                  tqdm; no PEAMoE step) where torch's few GB are too much (default: 1)
#   KEEP_VENVS     1: keep the smoke venvs (target/wheel-tools/venv-smoke-X.Y) after a pass
#   OUT            where the wheel goes (default: dist)
#   CARGO_TARGET_DIR  as for cargo (default: target)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
OUT="${OUT:-dist}"
SMOKE_PYTHONS="${SMOKE_PYTHONS:-3.9 3.13}"
SMOKE_TORCH="${SMOKE_TORCH:-1}"
KEEP_VENVS="${KEEP_VENVS:-0}"
WORK="$ROOT/target/wheel-tools"
START=$SECONDS

step() { printf '\n== %s\n' "$*"; }
die() { printf 'build_wheel.sh: %s\n' "$*" >&2; exit 1; }

step "tools: maturin, ziglang, auditwheel in $WORK/venv-build"
TOOLS="$WORK/venv-build"
[ -x "$TOOLS/bin/python" ] || "$PY" -m venv "$TOOLS"
if ! "$TOOLS/bin/python" -c "import maturin, ziglang, auditwheel" 2>/dev/null; then
    "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check \
        "maturin>=1.9,<2" ziglang auditwheel
fi
# maturin (cargo-zigbuild) runs zig as `python3 -m ziglang`: the tools venv comes first on PATH.
export PATH="$TOOLS/bin:$PATH"
maturin --version
python3 -m ziglang version | sed 's/^/zig /'

step "build: manylinux_2_28 abi3 wheel"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$VERSION" ] || die "no version in Cargo.toml [workspace.package]"
rm -f "$OUT"/deepseek_rs-"$VERSION"-*.whl
maturin build --release --zig --compatibility manylinux_2_28 --out "$OUT"
WHEELS=("$OUT"/deepseek_rs-"$VERSION"-cp39-abi3-manylinux_2_28_*.whl)
[ -f "${WHEELS[0]}" ] || die "no manylinux_2_28 abi3 wheel in $OUT: $(ls "$OUT")"
WHEEL=$(cd "$(dirname "${WHEELS[0]}")" && pwd)/$(basename "${WHEELS[0]}")
BUILD_S=$((SECONDS - START))

step "check: tags and contents of $(basename "$WHEEL")"
auditwheel show "$WHEEL" | tee "$WORK/auditwheel.txt"
tr -s ' \n' ' ' < "$WORK/auditwheel.txt" \
    | grep -q 'is consistent with the following platform tag: "manylinux_2_28_' \
    || die "auditwheel does not find the wheel manylinux_2_28-consistent"
python3 - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/", 1)[0] for n in names})
dist_info = [t for t in tops if t.endswith(".dist-info")]
assert len(dist_info) == 1 and tops == sorted(["deepseek_rs", *dist_info]), f"top-level entries: {tops}"
required = [
    "deepseek_rs/py.typed",
    "deepseek_rs/_core.pyi",
    "deepseek_rs/data/optimization.yaml",
    *(f"deepseek_rs/cuda/sources/{f}" for f in ("common.cuh", "gemm.cu", "permute.cu", "router.cu")),
    f"{dist_info[0]}/licenses/LICENSE",
]
missing = [r for r in required if r not in names]
assert not missing, f"missing from the wheel: {missing}"
cores = [n for n in names if n.startswith("deepseek_rs/_core.") and not n.endswith(".pyi")]
assert cores == ["deepseek_rs/_core.abi3.so"], f"extension modules: {cores}"
print(f"ok: {len(names)} files; top level {tops}; {len(required)} required files present")
EOF

find_python() {  # $1 = X.Y -> the path of a working pythonX.Y, or nothing
    local cand
    for cand in "$(command -v "python$1" || true)" \
                "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$1".*/bin/"python$1"; do
        if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "import sys, venv" >/dev/null 2>&1; then
            "$cand" -c "import sys; print(sys.executable)"
            return
        fi
    done
}

TESTED=()
for V in $SMOKE_PYTHONS; do
    SPY=$(find_python "$V")
    if [ -z "$SPY" ]; then
        printf '\n== smoke: CPython %s not found on PATH nor under pyenv: skipped\n' "$V"
        continue
    fi
    step "smoke: CPython $V ($SPY), torch=$SMOKE_TORCH"
    VENV="$WORK/venv-smoke-$V"
    "$SPY" -m venv --clear "$VENV"
    VPY="$VENV/bin/python"
    "$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip
    if [ "$SMOKE_TORCH" = 0 ]; then
        "$VPY" -m pip install --quiet --disable-pip-version-check --no-deps \
            "$WHEEL" "numpy>=1.24" "pyyaml>=6" "tqdm>=4.60"
    else
        "$VPY" -m pip install --quiet --disable-pip-version-check "$WHEEL"
    fi
    # Run from an empty folder, so that only the installed package can be imported.
    (cd "$(mktemp -d)"
     "$VENV/bin/deepseek-rs" --version
     "$VENV/bin/deepseek-rs" --help > help.txt && head -n 3 help.txt
     SMOKE_TORCH="$SMOKE_TORCH" VERSION="$VERSION" "$VPY" - <<'EOF'
import importlib.resources
import os
import sys

import numpy as np

import deepseek_rs
from deepseek_rs import _core

where = os.path.dirname(deepseek_rs.__file__)
assert "site-packages" in where, f"imported from {where}, not from the installed wheel"
assert deepseek_rs.__version__ == os.environ["VERSION"], deepseek_rs.__version__
assert "torch" not in sys.modules, "import deepseek_rs imported torch"
pkg = importlib.resources.files("deepseek_rs")
for f in ("py.typed", "_core.pyi", "data/optimization.yaml", "cuda/sources/gemm.cu", "cuda/sources/common.cuh"):
    assert pkg.joinpath(f).is_file(), f"{f} not installed"

tokens, experts, k = 8, 4, 2
logits = np.random.default_rng(0).standard_normal((tokens, experts)).astype(np.float32)
offsets, ids, weights, counts = _core.route_top_k(logits, k, True)
assert (offsets == np.arange(0, tokens * k + 1, k)).all(), offsets
chosen = np.sort(ids.reshape(tokens, k), axis=1)
assert (chosen == np.sort(np.argsort(-logits, axis=1)[:, :k], axis=1)).all(), ids
assert np.allclose(weights.reshape(tokens, k).sum(axis=1), 1.0) and counts.sum() == tokens * k
print(f"python {sys.version.split()[0]}: import (without torch), package data, _core.route_top_k ok")

if os.environ["SMOKE_TORCH"] != "0":
    import torch

    from deepseek_rs.cuda._runtime import SOURCES, kernel_dir

    assert "site-packages" in str(kernel_dir()), kernel_dir()
    assert all((kernel_dir() / s).is_file() for s in SOURCES), kernel_dir()
    layer = deepseek_rs.PEAMoE(16, 32, 4)  # progressive (top-p) routing, the default
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = layer(x)
    y.square().mean().backward()
    assert y.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    print(f"torch {torch.__version__}: PEAMoE forward/backward ok")
EOF
    )
    TESTED+=("$("$VPY" -c 'import platform; print(platform.python_version())')")
    [ "$KEEP_VENVS" = 1 ] || rm -rf "$VENV"  # a few GB each with torch
done
[ "${#TESTED[@]}" -gt 0 ] || die "no CPython of SMOKE_PYTHONS ($SMOKE_PYTHONS) found to smoke-test"

step "done in $((SECONDS - START)) s (build $BUILD_S s)"
echo "wheel:   $WHEEL ($(du -h "$WHEEL" | cut -f1))"
echo "smoke:   CPython ${TESTED[*]} (torch=$SMOKE_TORCH)"
