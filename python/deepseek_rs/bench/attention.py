"""Dynamic Attention Routing measured: work skipped, latency and language-model quality, in one run.

``deepseek-rs bench attention [--quick] [--section latency|quality|all] [--steps N] [--threads N]
[--json PATH] [--progress | -q]``. The quality section needs transformers (the ``hf`` extra).

* Latency: ``DynamicAttention`` (gate + Rust router + block-sparse attention, forward, no
  grad) against ``torch.nn.functional.scaled_dot_product_attention`` (causal) on the same
  random query/key/value at 1024, 4096 and 16384 tokens (1 sequence, 8 heads of 64, float32),
  with the share of the causal (query, key) pairs that DAR computes. Runs alternate between the
  two and the median is reported (the machine is shared and noisy). The article claims 57%
  lower latency at 16K tokens. ``--backend gather`` (default) gathers the selected blocks;
  ``--backend flex`` runs the compiled FlexAttention kernel with the selection's block mask
  and times the gather path too, as its baseline.
* Quality: small Hugging Face Llama language models over bytes (``--vocab``: word-level
  tokens) that differ only in attention: dense SDPA, DAR with and without the dense warm-up of
  its gate, and ablations: random routed blocks, an untrained gate and a fixed block pattern
  without a gate at the same selection sizes, the forced blocks alone at less work, the gate-only
  warm-up run sparse; trained for the same steps on the same batches (optionally all
  converted from one dense checkpoint, ``--pretrain-steps``) on real text available offline:
  the docstrings of the Python standard library's modules, classes and functions (files split
  90/10 into train and validation). With ``--task copy`` (the default) the second half of every
  1024-byte window repeats the text from 333 bytes back (``--copy-distance``; 0: a random
  distance per window): a passage copied from far back, as in retrieval tests, that only
  attention reaching beyond the local blocks can predict. Validation next-token accuracy
  (overall, on the copied part, on the rest), perplexity and the share of attention computed.
  The article claims 42% of the attention work skipped at 1024 tokens with 98.7% of the dense
  model's accuracy.
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import os
import pathlib
import re
import statistics
import sysconfig
import time
import warnings
import zlib
from collections import Counter
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.flex import selection_block_mask
from ..attention.hf import patch_attention
from ..attention.layout import block_layout
from ..attention.module import DynamicAttention, computed_fraction, work_fraction
from ..attention.training import gate_losses, gate_parameters, gate_warmup
from ..errors import InvalidValueError
from . import common

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


def latency(
    lengths, repeat: int, device: str, backend: str = "gather", say: Callable[[str], None] = lambda _msg: None
) -> Dict[str, Any]:
    """Print the latency table; return its rows (seconds, shares of dense causal attention)."""
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
    rows: List[Dict[str, Any]] = []
    for t in lengths:
        say(f"latency: {t} tokens")
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
                tiles = int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum())
                work = tiles * bs * bs / (8 * t * (t + 1) // 2)
            else:
                work = work_fraction(dar.last_selection, t, t, bs)
            times = median_times(fns, repeat)
        sdpa, ours = times[0], times[1]
        row = (
            f"| {t} | {frac:.1%} | {work:.1%} | {sdpa * 1e3:.1f} | {ours * 1e3:.1f} | {ours / sdpa:.3f} | "
            f"{1 - ours / sdpa:.1%} |"
        )
        rows.append(
            {
                "tokens": t,
                "pairs_attended": frac,
                "products_computed": work,
                "sdpa_s": sdpa,
                "dar_s": ours,
                "dar_over_sdpa": ours / sdpa,
                "latency_reduction": 1 - ours / sdpa,
            }
        )
        if flex:
            row += f" {times[2] * 1e3:.1f} | {ours / times[2]:.3f} |"
            rows[-1].update(gather_s=times[2], flex_over_gather=ours / times[2])
        print(row, flush=True)
    print("   article: 57% lower latency at 16K tokens")
    return {"device": device, "backend": backend, "repeat": repeat, "dar": DAR, "rows": rows}


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


def words(train: torch.Tensor, val: torch.Tensor, vocab: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bytes as word-level tokens: words, punctuation runs and whitespace runs (a leading space
    kept with the word, as GPT-2's pre-tokeniser does); the ``vocab - 1`` most frequent pieces of
    the training text get ids 1.., every other piece is id 0 (unknown)."""
    split = re.compile(r" ?\w+| ?[^\w\s]+|\s+")

    def pieces(x: torch.Tensor):
        return split.findall(bytes(x.tolist()).decode("utf-8", errors="replace"))

    train_pieces = pieces(train)
    ids = {w: i + 1 for i, (w, _) in enumerate(Counter(train_pieces).most_common(vocab - 1))}
    return tuple(torch.tensor([ids.get(w, 0) for w in p]) for p in (train_pieces, pieces(val)))


def language_model(seed: int, seq: int, hidden: int, layers: int, vocab: int = 256):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg)


def windows(data: torch.Tensor, seq: int, count: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - seq, (count,), generator=gen)
    return torch.stack([data[s : s + seq] for s in start.tolist()])


class CopyTask:
    """From the middle of each window on, every token repeats the token ``distance`` back.

    ``distance`` (one for all windows, or drawn per window) lies between ``seq // 4`` (at least
    ``2 * block_size``) and ``seq // 2 - block_size``: the second half of the window replays the
    text from that far back (a passage copied from earlier, as in retrieval tests), never from
    the first block (a sink) and never from the query's own or previous block, so only attention
    that reaches beyond the local blocks can predict it.
    """

    def __init__(self, seq: int, block_size: int, distance: Optional[int] = None):
        self.start = seq // 2  # first copied byte
        self.lo, self.hi = max(seq // 4, 2 * block_size), self.start - block_size
        if distance is not None:
            if not self.lo <= distance <= self.hi:
                raise InvalidValueError(f"the copy distance must be in {self.lo}..{self.hi}, got {distance}")
            self.lo = self.hi = distance
        if self.hi < self.lo:
            raise InvalidValueError(
                f"a copy task needs longer windows than {seq} bytes for blocks of {block_size}"
            )

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the windows with the copy, each window's distance)."""
        dist = torch.randint(self.lo, self.hi + 1, (x.shape[0],), generator=gen)
        x = x.clone()
        for row, d in zip(x, dist.tolist()):
            for i in range(self.start, x.shape[1], d):  # in pieces of at most d: the source is final
                row[i : i + d] = row[i - d : i].clone()[: x.shape[1] - i]
        return x, dist

    def copied_targets(self, seq: int) -> torch.Tensor:
        """[seq - 1] bool over next-byte targets: a copied byte, the first one excepted (nothing
        announces where the copy starts)."""
        return torch.arange(1, seq) > self.start


def batches(data, seq: int, count: int, gen: torch.Generator, task: Optional[CopyTask]) -> torch.Tensor:
    x = windows(data, seq, count, gen)
    return x if task is None else task.apply(x, gen)[0]


class RandomGate(nn.Module):
    """Ablation: uniform random gate scores, i.e. random routed blocks (a fresh draw every call)."""

    def __init__(self, gate: nn.Module, seed: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = gate.num_kv_heads, gate.head_dim
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, query_pooled: torch.Tensor, key_pooled: torch.Tensor) -> torch.Tensor:
        b, h, nq, _ = query_pooled.shape
        return torch.rand(b, h, nq, key_pooled.shape[2], generator=self.gen).to(query_pooled.device)


class OffsetGate(nn.Module):
    """Ablation: no gate, a fixed pattern. Scores 1 for the key blocks ``offsets`` before the
    query block, 0 elsewhere, so the router always takes those blocks (at the same selection
    size as the gate). The queries are the last of the keys, so query block n is key block
    n + NK - NQ."""

    def __init__(self, gate: nn.Module, offsets: Tuple[int, ...]):
        super().__init__()
        self.num_kv_heads, self.head_dim = gate.num_kv_heads, gate.head_dim
        self.offsets = offsets

    def forward(self, query_pooled: torch.Tensor, key_pooled: torch.Tensor) -> torch.Tensor:
        b, h, nq, _ = query_pooled.shape
        nk = key_pooled.shape[2]
        back = (torch.arange(nq).view(nq, 1) + nk - nq) - torch.arange(nk).view(1, nk)
        hit = sum((back == o) for o in self.offsets)
        return hit.to(torch.float32).expand(b, h, nq, nk).to(query_pooled.device)


def warm_up_gates(
    model, data, steps: int, batch: int, seq: int, lr: float, seed: int, task, dense: bool = True
) -> None:
    """DSA's warm-up (:func:`deepseek_rs.gate_warmup`), a stage before training: ``steps`` steps
    on the first batches of the training stream, only the gates trained (on their distillation
    loss, AdamW at a constant ``lr``), the rest of the model frozen; every block attended unless
    ``dense`` is False (the sparse-warm-up control)."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with gate_warmup(model, dense=dense) as gates:
        opt = torch.optim.AdamW(gates, lr=lr, weight_decay=0.0)
        for step in range(steps):
            model(batches(data, seq, batch, gen, task))
            gate = gate_losses(model)
            opt.zero_grad()
            gate.backward()
            opt.step()
            if step % max(1, steps // 3) == 0 or step == steps - 1:
                print(f"  warm-up step {step:4d}  gate loss {gate.item():.4f}", flush=True)


def train_lm(model, data, steps: int, batch: int, seq: int, lr: float, seed: int, task):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)  # the same batches for every model
    # the language model's parameters are clipped as for dense; the gates' (DAR only) stay out
    gates = {id(p) for p in gate_parameters(model)}
    clipped = [p for p in model.parameters() if id(p) not in gates]
    model.train()
    for step in range(steps):
        x = batches(data, seq, batch, gen, task)
        loss = model(x, labels=x).loss
        gate = gate_losses(model)
        opt.zero_grad()
        (loss + gate).backward()
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  gate loss {gate.item():.4f}", flush=True)
    return model.eval()


class Scores(NamedTuple):
    accuracy: float
    copy_accuracy: float  # nan without the copy task
    rest_accuracy: float
    perplexity: float
    copy_perplexity: float
    pairs: float  # DAR's share of the (query, key) pairs of dense causal attention
    products: float  # DAR's score products over the same
    routing: Tuple[str, ...] = ()  # per DAR layer: its routed blocks on the second half of the windows


def routed_offsets(m: DynamicAttention, seq: int) -> Counter:
    """Over the last forward of ``m`` (full windows of ``seq`` tokens), the routed (not forced)
    blocks of every (window, kv head, query block) of the second half of the window, as offsets
    back from the query block: Counter of (query block, offsets)."""
    idx = m.last_selection.block_indices.cpu()  # [B, Hkv, NQ, S], queries = keys
    nq = idx.shape[2]
    counts = Counter()
    for n in range(seq // 2 // m.block_size, nq):
        forced = {j for j in range(n - m.local_blocks, n + 1)} | ({0} if m.sink_block else set())
        for row in idx[:, :, n].reshape(-1, idx.shape[-1]).tolist():
            counts[n, tuple(sorted(n - j for j in row if j >= 0 and j not in forced))] += 1
    return counts


def describe_routing(counts: Counter) -> str:
    """The most common routed offsets and their share, and how often a query block's routed
    blocks differ from that query block's most common choice (between windows and heads)."""
    total = sum(counts.values())
    if not total:
        return "no query block"
    overall = Counter()
    top = Counter()
    for (n, offsets), c in counts.items():
        overall[offsets] += c
        top[n] = max(top[n], c)
    offsets, c = overall.most_common(1)[0]
    differ = 1 - sum(top.values()) / total
    back = ", ".join(f"n-{o}" for o in offsets) or "none"
    return f"blocks {back} in {c / total:.1%}; differs from the query block's usual choice in {differ:.1%}"


@torch.no_grad()
def evaluate(model, val: torch.Tensor, seq: int, count: int, task: Optional[CopyTask]) -> Scores:
    """Next-byte accuracy and perplexity on ``count`` validation windows, overall and per region."""
    x = batches(val, seq, count, torch.Generator().manual_seed(1234), task)
    copied = task.copied_targets(seq) if task is not None else torch.zeros(seq - 1, dtype=torch.bool)
    hits, nlls = [], []
    fracs, works = [], []
    dars = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    routes = [Counter() for _ in dars]
    for row in x.split(4):
        logits = model(row).logits[:, :-1].float()
        target = row[:, 1:]
        nlls.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
        hits.append(logits.argmax(-1) == target)
        fracs += [computed_fraction(m.last_selection, seq, seq, m.block_size) for m in dars]
        works += [work_fraction(m.last_selection, seq, seq, m.block_size) for m in dars]
        for r, m in zip(routes, dars):
            r.update(routed_offsets(m, seq))
    hit, nll = torch.cat(hits).double(), torch.cat(nlls).double()
    copy = copied.expand_as(hit)
    nan = float("nan")
    return Scores(
        hit.mean().item(),
        hit[copy].mean().item() if bool(copy.any()) else nan,
        hit[~copy].mean().item(),
        math.exp(nll.mean().item()),
        math.exp(nll[copy].mean().item()) if bool(copy.any()) else nan,
        statistics.mean(fracs) if fracs else 1.0,
        statistics.mean(works) if works else 1.0,
        tuple(describe_routing(r) for r in routes),
    )


# key: (row name, DynamicAttention arguments or None for dense SDPA, variant)
MODELS = {
    "dense": ("dense (SDPA)", None, None),
    "dar": ("DAR, dense warm-up", DAR, "warmup"),
    "dar-nowarm": ("DAR, no warm-up", DAR, None),
    # control: the same gate-only warm-up steps, run sparse (does the dense mode matter, or the steps?)
    "dar-sparsewarm": ("DAR, gate-only warm-up run sparse", DAR, "sparse-warmup"),
    # ablations: does the gate's choice matter? random routed blocks and the untrained gate at the
    # same selection sizes; the forced blocks alone at less work
    "fixed": ("own + previous + sink only", {**DAR, "top_k": 0}, None),
    "random": ("random routed blocks", DAR, "random"),
    "frozen": ("untrained identity gate", DAR, "frozen"),
    # a static pattern at DAR's work: the forced blocks plus the two blocks the trained gate converges
    # to on the copy task (333 bytes back: blocks n-6 and n-5), no gate
    "offset": ("fixed blocks n-6, n-5 (no gate)", DAR, "offset"),
}


def build(key: str, seed: int, base: nn.Module):
    """A copy of ``base`` with the attention of model ``key``."""
    _, dar_kwargs, variant = MODELS[key]
    model = copy.deepcopy(base)
    if dar_kwargs is not None:
        patch_attention(model, **dar_kwargs)
    dars = [m for m in model.modules() if isinstance(m, DynamicAttention)]
    for layer, m in enumerate(dars):
        if variant == "random":
            m.gate = RandomGate(m.gate, 1000 * seed + layer)  # each layer its own random pattern
        elif variant == "frozen":
            m.gate.requires_grad_(False)  # MoBA's parameter-free scoring, never trained
        elif variant == "offset":
            m.gate = OffsetGate(m.gate, (5, 6))
    return model


def quality(
    steps: int,
    seq: int,
    batch: int,
    hidden: int,
    layers: int,
    evals: int,
    seed: int = 0,
    models: Tuple[str, ...] = tuple(MODELS),
    task: str = "copy",
    warmup_steps: int = 0,
    lr: float = 3e-3,
    pretrain_steps: int = 0,
    copy_distance: Optional[int] = None,
    vocab: int = 256,
    say: Callable[[str], None] = lambda _msg: None,
) -> Dict[str, Any]:
    """Train and evaluate the ``models``; print their table; return it (one seed: no spread)."""
    train, val = docstrings(4_000_000)
    size = f"{len(train) / 1e6:.2f} MB train, {len(val) / 1e6:.2f} MB validation"
    if vocab != 256:
        train, val = words(train, val, vocab)
        size += f"; {len(train)} and {len(val)} tokens"
    copy_task = CopyTask(seq, DAR["block_size"], copy_distance) if task == "copy" else None
    print(
        f"\n== quality: {'byte' if vocab == 256 else f'word ({vocab} tokens)'}-level Llama ({layers} layers, "
        f"hidden {hidden}, "
        f"{hidden // 32} heads / {max(1, hidden // 64)} kv heads), "
        f"{pretrain_steps} dense pre-training steps, then {steps} steps per model, x {batch} x {seq} tokens, "
        f"peak lr {lr}, seed {seed}, stdlib docstrings "
        f"({size}), task {task}"
    )
    if copy_task is not None:
        print(
            f"copy: from token {copy_task.start} on, each token repeats the token "
            + (
                f"{copy_task.lo}"
                if copy_task.lo == copy_task.hi
                else f"a random {copy_task.lo}..{copy_task.hi}"
            )
            + " back (one distance per window); copy accuracy is over the copied tokens but the first"
        )
    print(
        f"DAR: {DAR}; the warm-up models first run {warmup_steps} warm-up steps (gates only, "
        "on the first batches; dense unless said otherwise), then the same steps as every model"
    )
    results = {}
    base = language_model(seed, seq, hidden, layers, vocab)
    if pretrain_steps:
        say("quality: dense pre-training")
        print(f"dense pre-training, {pretrain_steps} steps (other batches):", flush=True)
        start = time.perf_counter()
        train_lm(base, train, pretrain_steps, batch, seq, lr=lr, seed=seed + 1, task=copy_task)
        secs = time.perf_counter() - start
        results["pre-trained dense checkpoint"] = (evaluate(base, val, seq, evals, copy_task), secs, 0, 0)
    for key in models:
        name = MODELS[key][0]
        model = build(key, seed, base)
        say(f"quality: {name}")
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        variant = MODELS[key][2]
        warm = warmup_steps if variant in ("warmup", "sparse-warmup") else 0
        if warm:
            dense = variant == "warmup"
            warm_up_gates(model, train, warm, batch, seq, lr=lr, seed=seed, task=copy_task, dense=dense)
        train_lm(model, train, steps, batch, seq, lr=lr, seed=seed, task=copy_task)
        elapsed = time.perf_counter() - start
        results[name] = (evaluate(model, val, seq, evals, copy_task), elapsed, steps, warm)
    print(
        "\n| model | accuracy | copied part | rest | perplexity | copied part ppl | pairs attended "
        "| products computed | LM steps | gate-only warm-up steps | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows: Dict[str, Dict[str, Any]] = {}
    for name, (r, secs, lm, warm) in results.items():
        lm = pretrain_steps if name == "pre-trained dense checkpoint" else lm
        rows[name] = {
            "model": name,
            "seed": seed,
            **{f: _number(getattr(r, f)) for f in Scores._fields if f != "routing"},
            "lm_steps": lm,
            "warmup_steps": warm,
            "train_s": secs,
        }
        print(
            f"| {name} | {r.accuracy:.4f} | {r.copy_accuracy:.4f} | {r.rest_accuracy:.4f} | "
            f"{r.perplexity:.3f} | {r.copy_perplexity:.3f} | {r.pairs:.1%} | {r.products:.1%} | "
            f"{lm} | {warm} | {secs:.0f} |"
        )
    dense = results.get(MODELS["dense"][0])
    for name, (r, *_) in results.items():
        if dense is not None and name not in (MODELS["dense"][0], "pre-trained dense checkpoint"):
            d = dense[0]
            copied = f", {r.copy_accuracy / d.copy_accuracy:.2%} on the copied part" if copy_task else ""
            rows[name].update(
                work_skipped=1 - r.products,
                pairs_skipped=1 - r.pairs,
                accuracy_of_dense=r.accuracy / d.accuracy,
                copy_accuracy_of_dense=r.copy_accuracy / d.copy_accuracy if copy_task else None,
            )
            print(
                f"{name}: {1 - r.products:.1%} of the attention work (score products) and "
                f"{1 - r.pairs:.1%} of the pairs skipped at {seq} tokens; "
                f"{r.accuracy / d.accuracy:.2%} of the dense accuracy{copied}"
            )
    for name, (r, *_) in results.items():
        for layer, routing in enumerate(r.routing):
            print(f"{name}, layer {layer}, routed blocks of the second half's query blocks n: {routing}")
        rows[name]["routing"] = list(r.routing)
    print("   article: >= 42% of the attention work skipped at 1024 tokens with >= 98.7% of the accuracy")
    return {
        "seeds": [seed],  # every model trained once, from this seed: no spread over seeds
        "tokens": seq,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "pretrain_steps": pretrain_steps,
        "batch": batch,
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "lr": lr,
        "task": task,
        "copy_distance": None if copy_task is None else [copy_task.lo, copy_task.hi],
        "eval_windows": evals,
        "dar": DAR,
        "rows": list(rows.values()),
    }


def _number(x: float) -> Optional[float]:
    """``x``, or None for NaN (a copy figure without the copy task): JSON has no NaN."""
    return None if math.isnan(x) else x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="deepseek-rs bench attention", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    p.add_argument(
        "--progress", action="store_true", help="progress messages on stderr even when it is not a terminal"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    common.add_json(p)
    p.add_argument("--section", choices=("latency", "quality", "all"), default="all")
    p.add_argument("--steps", type=int, default=300, help="training steps of each language model")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="gate-only dense warm-up steps the 'dar' model runs before its --steps (default: a fifth of "
        "--steps, at least 1)",
    )
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated models of the quality section, from {', '.join(MODELS)} (default: all)",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=600,
        help="train one dense model this many steps first; every model then starts from it (as DSA "
        "converts a dense checkpoint); 0: every model from the same random initialisation",
    )
    p.add_argument(
        "--copy-distance",
        type=int,
        default=333,
        help="how far back the copy task's second half repeats the text, 256..448 (default 333, not a "
        "multiple of the block size); 0: a random distance per window",
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=256,
        help="256: bytes; more: word-level tokens, the most frequent VOCAB - 1 pieces and an unknown id",
    )
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the quality models (heads of 32)")
    p.add_argument("--layers", type=int, default=2, help="layers of the quality models")
    p.add_argument("--batch", type=int, default=4, help="windows of 1024 bytes per training step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (one-cycle schedule)")
    p.add_argument(
        "--task",
        choices=("copy", "text"),
        default="copy",
        help="quality task: copy (a far passage repeated in every window) or text (the plain docstrings)",
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
    if args.copy_distance and not 256 <= args.copy_distance <= 448:
        p.error(
            f"--copy-distance must be 0 or in 256..448 for windows of 1024 bytes, got {args.copy_distance}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = common.machine_info()
    # the common line without threads: the next one has the load and the threads the bench runs with
    print(common.format_machine(machine, threads=False), flush=True)
    say = common.progress("attention", args)
    results: Dict[str, Any] = {"load_average": list(os.getloadavg())}
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"machine: {os.cpu_count()} CPUs (load average {load}), torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads")
    if args.device.startswith("cuda") and torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    if args.section in ("latency", "all"):
        lengths = (256, 512) if args.quick else (1024, 4096, 16384)
        repeat = 2 if args.quick else args.repeat
        results["latency"] = latency(lengths, repeat, args.device, args.backend, say)
    if args.section in ("quality", "all"):
        steps = 4 if args.quick else args.steps
        warmup = max(1, steps // 5) if args.warmup_steps is None else args.warmup_steps
        if args.quick:
            results["quality"] = quality(
                steps,
                512,
                2,
                64,
                1,
                4,
                models=models,
                task=args.task,
                warmup_steps=warmup,
                pretrain_steps=2,
                say=say,
            )
        else:
            results["quality"] = quality(
                steps,
                1024,
                args.batch,
                args.hidden,
                args.layers,
                32,
                seed=args.seed,
                models=models,
                task=args.task,
                warmup_steps=warmup,
                lr=args.lr,
                pretrain_steps=args.pretrain_steps,
                copy_distance=args.copy_distance or None,
                vocab=args.vocab,
                say=say,
            )
    common.write_json(args.json, machine, args.quick, results)
    return 0
