"""Dynamic Attention Routing measured: work skipped, latency and language-model quality, in one run.

``deepseek-rs bench attention [--quick] [--section latency|quality|all] [--steps N] [--threads N]``
(or ``python benches/bench_attention.py ...``). The quality section needs transformers (the
``hf`` extra).

* Latency: ``DynamicAttention`` (gate + Rust router + block-sparse attention, forward, no
  grad) against ``torch.nn.functional.scaled_dot_product_attention`` (causal) on the same
  random query/key/value at 1024, 4096 and 16384 tokens (1 sequence, 8 heads of 64, float32),
  with the share of the causal (query, key) pairs that DAR computes. Runs alternate between the
  two and the median is reported (the machine is shared and noisy). The article claims 57%
  lower latency at 16K tokens. ``--backend gather`` (default) gathers the selected blocks;
  ``--backend flex`` runs the compiled FlexAttention kernel with the selection's block mask
  and times the gather path too, as its baseline.
* Quality: two small Hugging Face Llama language models over bytes, identical except that one
  is converted with ``patch_attention`` (DAR with its gate distillation loss), trained for the
  same steps with the same batches on real text available offline: the docstrings of the
  Python standard library's modules, classes and functions (files split 90/10 into train and
  validation). Validation next-byte accuracy, perplexity and the share of attention pairs
  computed, at 1024 tokens. The article claims 42% of the attention work skipped at 1024
  tokens with 98.7% of the dense model's accuracy.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import pathlib
import statistics
import sysconfig
import time
import warnings
import zlib
from typing import Tuple

import torch
import torch.nn.functional as F

from .attention import DynamicAttention, block_layout, computed_fraction, gate_losses, work_fraction
from .attention_flex import selection_block_mask
from .attention_patch import patch_attention

# DAR's selection in both sections: the query block's own block, the one before it, the first
# (sink) block and 2 more chosen by the gate, in blocks of 64 tokens.
DAR = dict(block_size=64, rule="top_k", top_k=2, local_blocks=1, sink_block=True)


def median_times(fns, repeat: int):
    """Alternate the functions ``repeat`` times after one warm-up each; median seconds of each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()  # GPU kernels run asynchronously
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def latency(lengths, repeat: int, device: str, backend: str = "gather") -> None:
    print(f"\n== latency: causal attention forward, 1 x 8 heads x 64, float32, {device}, median of {repeat}")
    print(f"DAR: {DAR}, backend={backend!r}")
    flex = backend == "flex"  # then the gather path is timed too, as the baseline of the flex path
    extra = " DAR (gather) ms | flex / gather |" if flex else ""
    print(
        "| tokens | pairs attended | products computed | SDPA ms | DAR ms | DAR / SDPA | latency reduction |"
        + extra
    )
    print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if flex else ""))
    gen = torch.Generator().manual_seed(0)
    bs = DAR["block_size"]
    for t in lengths:
        q, k, v = (torch.randn(1, 8, t, 64, generator=gen).to(device) for _ in range(3))
        dar = DynamicAttention(8, 8, 64, **DAR, backend=backend).to(device).eval()
        fns = [
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda q=q, k=k, v=v, dar=dar: dar(q, k, v),
        ]
        if flex:
            gather = DynamicAttention(8, 8, 64, **DAR, backend="gather").to(device).eval()
            gather.load_state_dict(dar.state_dict())
            fns.append(lambda q=q, k=k, v=v, m=gather: m(q, k, v))
        with torch.no_grad():
            dar(q, k, v)
            frac = computed_fraction(dar.last_selection, t, t, bs)
            if flex:  # the kernel computes the block mask's tiles, whole
                mask = selection_block_mask(
                    dar.last_selection.block_indices, block_layout(t, t, bs), q_len=t, k_len=t, num_heads=8
                )
                work = int(mask.to_dense().sum()) * bs * bs / (8 * t * (t + 1) // 2)
            else:
                work = work_fraction(dar.last_selection, t, t, bs)
            times = median_times(fns, repeat)
        sdpa, ours = times[0], times[1]
        row = (
            f"| {t} | {frac:.1%} | {work:.1%} | {sdpa * 1e3:.1f} | {ours * 1e3:.1f} | {ours / sdpa:.3f} | "
            f"{1 - ours / sdpa:.1%} |"
        )
        if flex:
            row += f" {times[2] * 1e3:.1f} | {ours / times[2]:.3f} |"
        print(row, flush=True)
    print("   article: 57% lower latency at 16K tokens")


def docstrings(limit_bytes: int):
    """(train, validation) bytes: stdlib docstrings, files split 90/10 by a hash of their name."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, val = bytearray(), bytearray()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "test" in rel or "site-packages" in rel or "idlelib" in rel:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        text = "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)
        if not text:
            continue
        dest = val if zlib.crc32(rel.encode()) % 10 == 0 else train
        dest += text.encode("utf-8") + b"\n\n"
        if len(train) >= limit_bytes and len(val) >= limit_bytes // 9:
            break
    return torch.tensor(list(train), dtype=torch.long), torch.tensor(list(val), dtype=torch.long)


def language_model(seed: int, seq: int, hidden: int, layers: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg)


def windows(data: torch.Tensor, seq: int, count: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - seq, (count,), generator=gen)
    return torch.stack([data[s : s + seq] for s in start.tolist()])


def train_lm(model, data, steps: int, batch: int, seq: int, lr: float, seed: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)  # the same batches for both models
    model.train()
    for step in range(steps):
        x = windows(data, seq, batch, gen)
        loss = model(x, labels=x).loss
        gate = gate_losses(model)
        opt.zero_grad()
        (loss + gate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  gate loss {gate.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def evaluate(model, val: torch.Tensor, seq: int, count: int):
    """Next-byte accuracy, perplexity and DAR's computed share of pairs on ``count`` validation windows."""
    x = windows(val, seq, count, torch.Generator().manual_seed(1234))
    correct = total = 0
    nll = 0.0
    fracs, works = [], []
    dars = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    for row in x.split(4):
        logits = model(row).logits[:, :-1]
        target = row[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        total += target.numel()
        fracs += [computed_fraction(m.last_selection, seq, seq, m.block_size) for m in dars]
        works += [work_fraction(m.last_selection, seq, seq, m.block_size) for m in dars]
    mean = statistics.mean
    return (
        correct / total,
        math.exp(nll / total),
        mean(fracs) if fracs else 1.0,
        mean(works) if works else 1.0,
    )


MODELS = {
    "dense": ("dense (SDPA)", None),
    "dar": ("DAR", DAR),
    # ablation: the same forced blocks, nothing routed (does the gate's choice matter?)
    "fixed": ("own + previous + sink, no routing", {**DAR, "top_k": 0}),
}


def quality(
    steps: int,
    seq: int,
    batch: int,
    hidden: int,
    layers: int,
    evals: int,
    seed: int = 0,
    models: Tuple[str, ...] = ("dense", "dar"),
) -> None:
    train, val = docstrings(4_000_000)
    print(
        f"\n== quality: byte-level Llama ({layers} layers, hidden {hidden}, "
        f"{hidden // 32} heads / {hidden // 64} kv heads), "
        f"{steps} steps x {batch} x {seq} tokens, seed {seed}, stdlib docstrings "
        f"({len(train) / 1e6:.2f} MB train, {len(val) / 1e6:.2f} MB validation)"
    )
    results = {}
    for key in models:
        name, dar_kwargs = MODELS[key]
        model = language_model(seed, seq, hidden, layers)
        if dar_kwargs is not None:
            patch_attention(model, **dar_kwargs)
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        train_lm(model, train, steps, batch, seq, lr=3e-3, seed=seed)
        elapsed = time.perf_counter() - start
        results[name] = (*evaluate(model, val, seq, evals), elapsed)
    print(
        "\n| model | val next-byte accuracy | val perplexity | pairs attended | products computed | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (acc, ppl, frac, work, secs) in results.items():
        print(f"| {name} | {acc:.4f} | {ppl:.3f} | {frac:.1%} | {work:.1%} | {secs:.0f} |")
    dense = results.get(MODELS["dense"][0])
    for name, res in results.items():
        if dense is not None and res is not dense:
            print(
                f"{name}: {1 - res[3]:.1%} of the attention work (score products) and {1 - res[2]:.1%} of "
                f"the pairs skipped at {seq} tokens, {res[0] / dense[0]:.2%} of the dense accuracy"
            )
    print("   article: >= 42% of the attention work skipped at 1024 tokens with >= 98.7% of the accuracy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="deepseek-rs bench attention", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    p.add_argument("--section", choices=("latency", "quality", "all"), default="all")
    p.add_argument("--steps", type=int, default=150, help="training steps of each language model")
    p.add_argument(
        "--models",
        default="dense,dar",
        help=f"comma-separated models of the quality section, from {', '.join(MODELS)} (default dense,dar)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the quality section (weights and batches)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each attention per length")
    p.add_argument("--device", default="cpu", help="device of the latency section (cpu or cuda)")
    p.add_argument(
        "--backend",
        choices=("gather", "flex"),
        default="gather",
        help="DAR's block-sparse path in the latency section: gathered blocks (torch) or compiled "
        "FlexAttention with the selection's block mask",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); on a shared, loaded machine 1 avoids waiting on "
        "descheduled threads at every op",
    )
    args = p.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models takes a comma-separated list from {', '.join(MODELS)}, got {args.models!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs (load average {load}), torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads")
    if args.device.startswith("cuda") and torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    if args.section in ("latency", "all"):
        lengths = (256, 512) if args.quick else (1024, 4096, 16384)
        latency(lengths, 2 if args.quick else args.repeat, args.device, args.backend)
    if args.section in ("quality", "all"):
        if args.quick:
            quality(steps=4, seq=256, batch=2, hidden=64, layers=1, evals=4, models=models)
        else:
            quality(
                steps=args.steps,
                seq=1024,
                batch=8,
                hidden=128,
                layers=2,
                evals=32,
                seed=args.seed,
                models=models,
            )
    return 0
