"""``deepseek-rs train-reference``: build (or verify) the corpus and train the reference model.

The checkpoint goes to ``--out`` (default: ``<cache>/reference``, the cache being
``$DEEPSEEK_RS_LM_CACHE`` or ``~/.cache/deepseek_rs/lm``), the corpus to ``--corpus`` (default
``<cache>/corpus``). A checkpoint already there, trained by the same recipe, is kept unless
``--force``; a corpus is rebuilt when missing, damaged, or built from other package versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import corpus
from .model import SIZES
from .train import (
    QUICK_LIMIT_BYTES,
    Recipe,
    default_cache,
    quick_recipe,
    reference_recipe,
    train_reference,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepseek-rs train-reference",
        description=(
            "Build the offline corpus and train the reference MoE language model (a Qwen3-MoE whose "
            "MoE blocks run on PEAMoE); see docs/reference-model.md for the recipe."
        ),
    )
    p.add_argument("--out", type=Path, help="checkpoint directory (default: <cache>/reference)")
    p.add_argument("--corpus", type=Path, help="corpus directory (default: <cache>/corpus)")
    p.add_argument(
        "--expect",
        type=Path,
        help="a recorded corpus manifest (docs/reference-corpus.json): with the same package "
        "versions the build must reproduce its checksums",
    )
    p.add_argument("--corpus-only", action="store_true", help="build or verify the corpus, then stop")
    p.add_argument("--rebuild-corpus", action="store_true", help="rebuild the corpus even if intact")
    p.add_argument("--size", choices=sorted(SIZES), help="model size (default: reference)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--tokens", type=int, help="training tokens")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--router", choices=["top_k", "top_p"], help="routing rule while training (default top_k)")
    p.add_argument("--top-p", type=float, default=0.5, help="top_p routing's mass (default 0.5)")
    p.add_argument("--entropy", type=float, help="router entropy loss weight (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny model on a 400 kB corpus slice (seconds)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds this recipe's model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = quick_recipe() if args.quick else reference_recipe()
    fields: Dict[str, Any] = {}
    if args.size:
        fields["size"] = SIZES[args.size]
    for name in ("seed", "tokens", "batch_size", "lr", "entropy"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.router == "top_p":
        fields["routing"] = {"rule": "top_p", "top_p": args.top_p, "min_k": 1, "renormalize": True}
    return recipe.replace(**fields)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = default_cache()
    limit = QUICK_LIMIT_BYTES if args.quick else None
    corpus_dir = args.corpus or cache / ("corpus-quick" if args.quick else "corpus")
    manifest = corpus.ensure(corpus_dir, expect=args.expect, rebuild=args.rebuild_corpus, limit_bytes=limit)
    print(
        f"corpus {corpus_dir}: {manifest['text_bytes']} bytes of text, "
        + ", ".join(
            f"{k} {v.get('documents', '-')} docs" for k, v in manifest["files"].items() if "documents" in v
        ),
        file=sys.stderr,
    )
    if args.corpus_only:
        return 0
    out = args.out or cache / ("reference-quick" if args.quick else "reference")
    recipe = recipe_from_args(args)
    rp = out / "recipe.json"
    if not args.force and (out / "config.json").is_file() and rp.is_file():
        if Recipe.from_json(json.loads(rp.read_text())) == recipe:
            print(f"{out} already holds a model trained by this recipe (--force retrains)", file=sys.stderr)
            return 0
    metrics = train_reference(out, recipe, corpus_dir, limit_bytes=limit, progress=not args.quiet)
    print(json.dumps({"out": str(out), **metrics}, indent=1, default=str))
    return 0


__all__ = ["main", "recipe_from_args"]


if __name__ == "__main__":
    sys.exit(main())
