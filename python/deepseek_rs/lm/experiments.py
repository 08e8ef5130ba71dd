"""The article's quality claims measured on the reference model (issue 16), one function each,
every arm over several seeds, results as JSON (``deepseek-rs lm-experiment NAME --json PATH``).

* :func:`pea`: top-k (k = 2) against progressive top-p routing, trained from scratch at the same
  training tokens, with the router-entropy loss off and on, and top-p at the same training
  compute (the expert pairs that top-k ran): validation perplexity and experts per token.
* :func:`datafilter`: the same model trained on the raw train split and on the train split after
  ``deepseek-rs filter`` (stage 1 alone; stages 1 and 3), at the same token budget; perplexity
  on the raw validation split and on its filtered ("clean") part.
* :func:`int8`: the trained reference model in fp32, after post-training int8 quantization
  (``convert_int8``) and after QAT (``prepare_qat``, a short fine-tune, ``convert_int8``),
  against fp32 fine-tuned for the same steps; then the same at 4-bit weights (per output row,
  this module's own fake quantizer), a setting where post-training quantization loses quality.

Each result holds the per-seed values, their mean and sample standard deviation, the budgets,
the machine, the seconds taken, and the command that reruns it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..datafilter import FilterConfig, run_filter
from ..moe.layer import SwiGLUExperts
from ..quant import convert_int8, prepare_qat
from .model import build, load
from .train import (
    QUICK_LIMIT_BYTES,
    Data,
    Recipe,
    default_cache,
    ensure_reference,
    evaluate,
    machine,
    quick_recipe,
    reference_recipe,
    train,
)

SEEDS = (0, 1, 2)


def summary(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "values": vals,
    }


def _arm_summary(runs: List[Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Any]:
    return {k: summary([r[k] for r in runs]) for k in keys}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- PEA ---------------------------------------------------------------------------------------

TOP_K: Dict[str, Any] = {"rule": "top_k", "top_k": 2, "renormalize": True}


def pea_arms(top_p: float = 0.5, max_k: int = 4, entropy: float = 0.05) -> Dict[str, Dict[str, Any]]:
    """name -> Recipe fields (``compute`` True: at top-k's expert pairs rather than its tokens)."""
    top_p_routing = {"rule": "top_p", "top_p": top_p, "min_k": 1, "max_k": max_k, "renormalize": True}
    return {
        "top_k2": {"routing": TOP_K, "entropy": 0.0},
        "top_p": {"routing": top_p_routing, "entropy": 0.0},
        "top_p+entropy": {"routing": top_p_routing, "entropy": entropy},
        "top_p+entropy@compute": {"routing": top_p_routing, "entropy": entropy, "compute": True},
    }


def pea(
    data: Data,
    base: Recipe,
    seeds: Sequence[int] = SEEDS,
    arms: Optional[Dict[str, Dict[str, Any]]] = None,
    eval_tokens: int = 65536,
) -> Dict[str, Any]:
    arms = arms or pea_arms()
    layers = base.size.layers
    results: Dict[str, Any] = {}
    per_seed: Dict[str, List[Dict[str, Any]]] = {name: [] for name in arms}
    for seed in seeds:
        for name, fields in arms.items():
            fields = dict(fields)
            compute = fields.pop("compute", False)
            recipe = base.replace(seed=seed, **fields)
            if compute:  # the expert pairs top-k ran: k per token and layer
                recipe = recipe.replace(expert_pairs=TOP_K["top_k"] * base.tokens * layers)
            model = build(recipe.size, data.vocab_size, seed, eos_token_id=data.eos_id, **recipe.routing)
            run = train(model, data.stream("train"), recipe)
            ev = evaluate(model, data.stream("valid"), recipe.size.context, eval_tokens)
            row = {**run, **{f"valid_{k}": v for k, v in ev.items()}, "seed": seed}
            per_seed[name].append(row)
            _log(
                f"pea {name} seed {seed}: ppl {ev['perplexity']:.2f} experts/token "
                f"{ev['experts_per_token']:.2f} (train {run['train_experts_per_token']:.2f}) "
                f"{run['tokens']} tokens {run['seconds']:.0f}s"
            )
    keys = (
        "valid_perplexity",
        "valid_loss",
        "valid_accuracy",
        "valid_experts_per_token",
        "train_experts_per_token",
        "tokens",
        "expert_pairs",
        "seconds",
    )
    for name in arms:
        results[name] = {
            "recipe_fields": arms[name],
            "runs": per_seed[name],
            **_arm_summary(per_seed[name], keys),
        }
    base_runs = per_seed["top_k2"]
    for name in arms:
        if name == "top_k2":
            continue
        # paired by seed: the same initialisation and data order
        results[name]["vs_top_k2"] = {
            "compute_change": summary(
                [
                    r["valid_experts_per_token"] / b["valid_experts_per_token"] - 1
                    for r, b in zip(per_seed[name], base_runs)
                ]
            ),
            "perplexity_change": summary(
                [r["valid_perplexity"] / b["valid_perplexity"] - 1 for r, b in zip(per_seed[name], base_runs)]
            ),
        }
    return {"arms": results, "article": {"compute_change": -0.35, "perplexity_change": -0.12}}


# ---- the data filter ---------------------------------------------------------------------------

FILTER_ARMS = {
    "density": FilterConfig(
        density=True, hard_examples=False, plot=False, write_dropped=False, annotate=False
    ),
    "density+hard_examples": FilterConfig(
        density=True, hard_examples=True, plot=False, write_dropped=False, annotate=False
    ),
}


def _kept(outdir: Path) -> List[Path]:
    return sorted((outdir / "kept").glob("*.jsonl*"))


def datafilter(
    data: Data,
    base: Recipe,
    work: Path,
    seeds: Sequence[int] = SEEDS,
    arms: Optional[Dict[str, FilterConfig]] = None,
    eval_tokens: int = 65536,
) -> Dict[str, Any]:
    arms = FILTER_ARMS if arms is None else arms
    train_streams: Dict[str, Tensor] = {"raw": data.stream("train")}
    filter_stats: Dict[str, Any] = {}
    clean_valid: Optional[Tensor] = None
    for name, cfg in arms.items():
        out = Path(work) / f"filter-{name}"
        t = time.perf_counter()
        stats = run_filter([data.dir / "train.jsonl"], out / "train", cfg)
        filter_stats[name] = {"seconds": time.perf_counter() - t, **_stat_summary(stats)}
        train_streams[name] = data.tokenize(_kept(out / "train"))
        if clean_valid is None:  # the held-out clean set: the valid split through stage 1
            run_filter([data.dir / "valid.jsonl"], out / "valid", FILTER_ARMS["density"])
            clean_valid = data.tokenize(_kept(out / "valid"))
    evals = {"raw_valid": data.stream("valid")}
    if clean_valid is not None:
        evals["clean_valid"] = clean_valid
    per_seed: Dict[str, List[Dict[str, Any]]] = {name: [] for name in train_streams}
    for seed in seeds:
        for name, stream in train_streams.items():
            recipe = base.replace(seed=seed)
            model = build(recipe.size, data.vocab_size, seed, eos_token_id=data.eos_id, **recipe.routing)
            run = train(model, stream, recipe)
            row: Dict[str, Any] = {**run, "seed": seed, "train_stream_tokens": int(stream.numel())}
            for ename, es in evals.items():
                ev = evaluate(model, es, recipe.size.context, eval_tokens)
                row[f"{ename}_perplexity"] = ev["perplexity"]
                row[f"{ename}_accuracy"] = ev["accuracy"]
            per_seed[name].append(row)
            _log(
                f"filter {name} seed {seed}: "
                + ", ".join(f"{k} {row[k]:.2f}" for k in row if k.endswith("perplexity"))
            )
    keys = [k for k in per_seed["raw"][0] if k.endswith(("perplexity", "accuracy"))] + ["tokens", "seconds"]
    arms_out: Dict[str, Any] = {}
    for name, runs in per_seed.items():
        arms_out[name] = {"runs": runs, **_arm_summary(runs, keys)}
        if name != "raw":
            arms_out[name]["filter"] = filter_stats[name]
            arms_out[name]["vs_raw"] = {
                k: summary([r[k] / b[k] - 1 for r, b in zip(runs, per_seed["raw"])])
                for k in keys
                if k.endswith("perplexity")
            }
    return {"arms": arms_out}


def _stat_summary(stats: Dict[str, Any]) -> Dict[str, Any]:
    keep = {}
    for k, v in stats.items():
        if isinstance(v, (int, float, str)) or (
            isinstance(v, dict) and len(json.dumps(v, default=str)) < 2000
        ):
            keep[k] = v
    return keep


# ---- INT8 --------------------------------------------------------------------------------------


class _FakeQuantRows(nn.Module):
    """A parametrization: the weight rounded per output row to a symmetric ``bits`` grid, with
    the straight-through gradient."""

    def __init__(self, bits: int):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            scale = w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / self.qmax
            grid = torch.round(w.detach() / scale).clamp_(-self.qmax, self.qmax) * scale
        return w + (grid - w).detach()


def fake_quantize_weights(model: nn.Module, bits: int) -> nn.Module:
    """Register per-row ``bits``-bit fake quantization on every Linear (but the tied LM head)
    and expert weight of ``model``, in place (activations stay float)."""
    from torch.nn.utils import parametrize

    head = getattr(model, "lm_head", None)
    for m in list(model.modules()):
        if isinstance(m, nn.Linear) and m is not head:
            parametrize.register_parametrization(m, "weight", _FakeQuantRows(bits))
        elif isinstance(m, SwiGLUExperts):
            for name in ("gate_up_proj", "down_proj"):
                parametrize.register_parametrization(m, name, _FakeQuantRows(bits))
    return model


def int8(
    data: Data,
    reference: Path,
    base: Recipe,
    seeds: Sequence[int] = SEEDS,
    steps_tokens: int = 40960,
    eval_tokens: int = 65536,
    low_bits: int = 4,
) -> Dict[str, Any]:
    ctx = base.size.context
    valid = data.stream("valid")

    def ev(model: nn.Module) -> Dict[str, float]:
        e = evaluate(model, valid, ctx, eval_tokens)
        return {"perplexity": e["perplexity"], "accuracy": e["accuracy"]}

    fp32 = ev(load(reference))
    ptq8 = ev(convert_int8(load(reference)))
    ptq_low = ev(fake_quantize_weights(load(reference), low_bits))
    # Fine-tuning: a tenth of the reference's peak learning rate, constant after a short warm-up.
    ft = base.replace(tokens=steps_tokens, lr=base.lr * 0.1, min_lr_ratio=1.0, warmup=0.1)
    per_seed: Dict[str, List[Dict[str, float]]] = {
        "fp32_finetuned": [],
        "qat_int8": [],
        f"qat_w{low_bits}": [],
    }
    makers: Dict[str, Callable[[nn.Module], nn.Module]] = {
        "fp32_finetuned": lambda m: m,
        "qat_int8": prepare_qat,
        f"qat_w{low_bits}": lambda m: fake_quantize_weights(m, low_bits),
    }
    for seed in seeds:
        for name, make in makers.items():
            model = make(load(reference).train())
            train(model, data.stream("train"), ft.replace(seed=seed))
            if name == "qat_int8":
                model = convert_int8(model)
            per_seed[name].append(ev(model))
            _log(f"int8 {name} seed {seed}: {per_seed[name][-1]}")
    arms: Dict[str, Any] = {
        "fp32": fp32,
        "ptq_int8": ptq8,
        f"ptq_w{low_bits}": ptq_low,
    }
    for name, runs in per_seed.items():
        arms[name] = {**_arm_summary(runs, ("perplexity", "accuracy")), "runs": runs}
    kept = {
        "ptq_int8": ptq8["accuracy"] / fp32["accuracy"],
        f"ptq_w{low_bits}": ptq_low["accuracy"] / fp32["accuracy"],
        "qat_int8": summary([r["accuracy"] / fp32["accuracy"] for r in per_seed["qat_int8"]]),
        "qat_int8_vs_fp32_finetuned": summary(
            [q["accuracy"] / f["accuracy"] for q, f in zip(per_seed["qat_int8"], per_seed["fp32_finetuned"])]
        ),
        f"qat_w{low_bits}_vs_fp32_finetuned": summary(
            [
                q["accuracy"] / f["accuracy"]
                for q, f in zip(per_seed[f"qat_w{low_bits}"], per_seed["fp32_finetuned"])
            ]
        ),
    }
    return {
        "arms": arms,
        "accuracy_kept": kept,
        "finetune_tokens": steps_tokens,
        "article": {"accuracy_kept": 0.992},
    }


# ---- the command -------------------------------------------------------------------------------

EXPERIMENTS = ("pea", "filter", "int8")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepseek-rs lm-experiment",
        description="Measure one of the article's quality claims on the reference model (issue 16).",
    )
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--tokens", type=int, default=122880, help="training tokens per run (default 122880)")
    p.add_argument("--finetune-tokens", type=int, default=40960, help="int8: QAT / fine-tune tokens")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--top-p", type=float, default=0.5, help="pea: top_p routing's mass (default 0.5)")
    p.add_argument("--max-k", type=int, default=4, help="pea: top_p routing's most experts (default 4)")
    p.add_argument("--entropy", type=float, default=0.05, help="pea: entropy loss weight when on (0.05)")
    p.add_argument("--low-bits", type=int, default=4, help="int8: the weight bits of the hard setting (4)")
    p.add_argument("--corpus", type=Path, help="corpus directory (default: the cache's)")
    p.add_argument("--reference", type=Path, help="int8: the reference checkpoint (default: the cache's)")
    p.add_argument("--work", type=Path, help="filter: work directory (default: the cache's)")
    p.add_argument("--quick", action="store_true", help="tiny model, corpus slice, 2 seeds: a smoke run")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = default_cache()
    if args.quick:
        corpus_dir = args.corpus or cache / "corpus-quick"
        data = Data(corpus_dir, limit_bytes=QUICK_LIMIT_BYTES)
        base = quick_recipe()
        seeds = args.seeds if args.seeds != list(SEEDS) else [0, 1]
        eval_tokens = min(args.eval_tokens, 4096)
    else:
        corpus_dir = args.corpus or cache / "corpus"
        data = Data(corpus_dir)
        base = reference_recipe().replace(tokens=args.tokens)
        seeds = args.seeds
        eval_tokens = args.eval_tokens
    start = time.perf_counter()
    if args.name == "pea":
        arms = pea_arms(top_p=args.top_p, max_k=args.max_k, entropy=args.entropy)
        result = pea(data, base, seeds, arms=arms, eval_tokens=eval_tokens)
    elif args.name == "filter":
        result = datafilter(data, base, args.work or cache / "work", seeds, eval_tokens=eval_tokens)
    else:
        rec = quick_recipe() if args.quick else reference_recipe()
        ref = args.reference or cache / ("reference-quick" if args.quick else "reference")
        ensure_reference(ref, rec, corpus_dir, limit_bytes=QUICK_LIMIT_BYTES if args.quick else None)
        ft = min(args.finetune_tokens, 4096) if args.quick else args.finetune_tokens
        result = int8(data, ref, rec, seeds, steps_tokens=ft, eval_tokens=eval_tokens, low_bits=args.low_bits)
    result.update(
        experiment=args.name,
        seeds=list(seeds),
        budget={
            "tokens_per_run": result.get("finetune_tokens", base.tokens),
            "batch_size": base.batch_size,
            "context": base.size.context,
            "eval_tokens": eval_tokens,
        },
        size=base.size.__dict__,
        machine=machine(),
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - start,
        command="deepseek-rs lm-experiment " + " ".join(argv if argv is not None else sys.argv[1:]),
        corpus_sha256={k: v["sha256"] for k, v in data.manifest["files"].items()},
    )
    text = json.dumps(result, indent=1, default=_json_default)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
