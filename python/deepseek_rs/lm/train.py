"""Training and evaluating the reference model (``deepseek-rs train-reference``).

The recipe (:class:`Recipe`): AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), a linear
warm-up then a cosine decay to a tenth of the peak learning rate, gradient clipping at 1.0,
cross-entropy plus the PEAMoE blocks' auxiliary losses (load balancing 0.01, z-loss 0.001,
router entropy ``entropy`` (0 unless asked)). Each step takes ``batch_size`` windows of
``context + 1`` tokens at offsets drawn from a generator seeded by ``seed`` from the train
split's token stream (documents joined by ``<|endoftext|>``). The model's initialisation, the
data order and so the run are fixed by the seed (same machine, same thread count).

The budget is ``tokens`` (training tokens) or, for compute-matched comparisons,
``expert_pairs``: the run stops once the MoE blocks have run that many (token, expert) pairs,
summed over layers; the schedule follows whichever budget is given.

Evaluation (:func:`evaluate`): non-overlapping windows of ``context`` tokens from the start of a
split's stream, no gradient: mean cross-entropy, perplexity ``exp(loss)``, next-token top-1
accuracy, and the mean number of experts per token and layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..moe import RoutingConfig
from . import corpus
from .model import (
    REFERENCE,
    TINY,
    ModelSize,
    aux_loss,
    build,
    experts_per_token,
    moe_layers,
    parameter_counts,
)

log = logging.getLogger(__name__)


#: The reference run's training tokens (see docs/reference-model.md for the time it takes).
REFERENCE_TOKENS = 614_400


@dataclass(frozen=True)
class Recipe:
    """Everything that fixes a training run besides the data."""

    size: ModelSize = REFERENCE
    seed: int = 0
    tokens: int = 2_000_000
    expert_pairs: Optional[int] = None  # stop at this many routed (token, expert) pairs instead
    batch_size: int = 8
    lr: float = 3e-3
    warmup: float = 0.05  # fraction of the budget
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    load_balancing: float = 0.01
    z_loss: float = 0.001
    entropy: float = 0.0
    routing: Dict[str, Any] = field(
        default_factory=lambda: {"rule": "top_k", "top_k": 2, "renormalize": True}
    )

    def replace(self, **fields: Any) -> Recipe:
        return dataclasses.replace(self, **fields)

    def routing_config(self) -> RoutingConfig:
        return RoutingConfig(**self.routing)

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> Recipe:
        d = dict(d)
        d["size"] = ModelSize(**d["size"])
        return cls(**d)


#: The corpus slice of the quick runs (tests, ``--quick``): the first documents, 400 kB of text.
QUICK_LIMIT_BYTES = 400_000


def reference_recipe() -> Recipe:
    """The reference model's recipe: ``REFERENCE`` size, seed 0, top-2 of 8 experts."""
    return Recipe(size=REFERENCE, seed=0, tokens=REFERENCE_TOKENS, batch_size=8, lr=3e-3)


def quick_recipe() -> Recipe:
    """A recipe that trains in seconds (``TINY`` size, 16K tokens)."""
    return Recipe(size=TINY, seed=0, tokens=16384, batch_size=4, lr=3e-3)


def _tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def tokenize(
    jsonl: Sequence[Union[str, Path]], tokenizer: Union[str, Path], cache_dir: Optional[Path] = None
) -> Tensor:
    """The token stream of the ``text`` fields of JSONL files (``.gz`` too), documents joined by
    ``<|endoftext|>``, as int64; cached as ``.npy`` under ``cache_dir`` by the inputs' and the
    tokenizer's SHA-256."""
    paths = [Path(p) for p in jsonl]
    key = hashlib.sha256()
    for p in [*paths, Path(tokenizer)]:
        key.update(corpus.sha256_file(p).encode())
    cached = Path(cache_dir) / f"tokens-{key.hexdigest()[:16]}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return torch.from_numpy(np.load(cached).astype(np.int64))
    tok = _tokenizer(Path(tokenizer))
    eos = tok.token_to_id(corpus.EOS)
    parts: List[np.ndarray] = []
    for p in paths:
        texts = list(corpus.iter_texts(p))
        for i in range(0, len(texts), 256):
            for enc in tok.encode_batch(texts[i : i + 256]):
                parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, stream)
    return torch.from_numpy(stream.astype(np.int64))


def _lr_factor(progress: float, recipe: Recipe) -> float:
    if progress < recipe.warmup:
        return max(progress / recipe.warmup, 1e-3)
    t = min((progress - recipe.warmup) / max(1.0 - recipe.warmup, 1e-9), 1.0)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)


def batches(stream: Tensor, context: int, batch_size: int, seed: int) -> Any:
    """An endless generator of [batch_size, context + 1] windows at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    hi = stream.numel() - context - 1
    if hi <= 0:
        raise ValueError(
            f"the token stream ({stream.numel()} tokens) is shorter than a window ({context + 1})"
        )
    idx = torch.arange(context + 1)
    while True:
        starts = torch.randint(0, hi, (batch_size,), generator=g)
        yield stream[starts[:, None] + idx]


def train(
    model: nn.Module,
    stream: Tensor,
    recipe: Recipe,
    progress: bool = False,
    on_step: Any = None,
) -> Dict[str, Any]:
    """Train ``model`` in place on ``stream`` by ``recipe``; returns the run's statistics."""
    torch.manual_seed(recipe.seed)
    ctx = recipe.size.context
    opt = _optimizer(model, recipe)
    data = batches(stream, ctx, recipe.batch_size, recipe.seed + 1)
    layers = len(moe_layers(model))
    tokens = pairs = step = 0
    start = time.perf_counter()
    losses: List[float] = []
    model.train()
    while True:
        done = tokens / recipe.tokens if recipe.expert_pairs is None else pairs / recipe.expert_pairs
        if done >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = recipe.lr * _lr_factor(done, recipe)
        batch = next(data)
        logits = model(input_ids=batch[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss = ce + aux_loss(model, recipe.load_balancing, recipe.z_loss, recipe.entropy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        n = batch.shape[0] * ctx
        tokens += n
        pairs += int(round(experts_per_token(model) * n * layers))
        step += 1
        losses.append(float(ce.detach()))
        if on_step is not None:
            on_step(step, model)
        if progress and (step % 10 == 0 or step == 1):
            el = time.perf_counter() - start
            print(
                f"step {step} tokens {tokens} loss {losses[-1]:.3f} experts/token "
                f"{experts_per_token(model):.2f} {tokens / el:.0f} tok/s {el:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    return {
        "steps": step,
        "tokens": tokens,
        "expert_pairs": pairs,
        "train_experts_per_token": pairs / max(tokens * layers, 1),
        "final_train_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, stream: Tensor, context: int, max_tokens: int = 65536, batch_size: int = 16
) -> Dict[str, float]:
    """Loss, perplexity, next-token accuracy and experts per token on ``stream``'s first windows."""
    model.eval()
    n = min((stream.numel() - 1) // context, max(max_tokens // context, 1))
    if n < 1:
        raise ValueError(
            f"the token stream ({stream.numel()} tokens) is shorter than a window ({context + 1})"
        )
    total_loss = 0.0
    correct = 0
    count = 0
    experts = 0.0
    for i in range(0, n, batch_size):
        rows = range(i, min(i + batch_size, n))
        batch = torch.stack([stream[r * context : r * context + context + 1] for r in rows])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        target = batch[:, 1:]
        total_loss += float(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        )
        correct += int((logits.argmax(-1) == target).sum())
        experts += experts_per_token(model) * target.numel()
        count += target.numel()
    loss = total_loss / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": correct / count,
        "experts_per_token": experts / count,
        "eval_tokens": count,
    }


def default_cache() -> Path:
    """``$DEEPSEEK_RS_LM_CACHE``, else ``$XDG_CACHE_HOME/deepseek_rs/lm`` (``~/.cache/...``)."""
    env = os.environ.get("DEEPSEEK_RS_LM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepseek_rs" / "lm"


class Data:
    """The corpus's token streams (built and tokenized on first use)."""

    def __init__(
        self,
        corpus_dir: Path,
        limit_bytes: Optional[int] = None,
        expect: Optional[Path] = None,
        vocab_size: int = corpus.VOCAB_SIZE,
    ):
        self.dir = Path(corpus_dir)
        self.manifest = corpus.ensure(self.dir, expect=expect, limit_bytes=limit_bytes, vocab_size=vocab_size)
        self.tokenizer = self.dir / "tokenizer.json"
        self._streams: Dict[str, Tensor] = {}

    @property
    def vocab_size(self) -> int:
        return int(_tokenizer(self.tokenizer).get_vocab_size())

    @property
    def eos_id(self) -> int:
        return int(_tokenizer(self.tokenizer).token_to_id(corpus.EOS))

    def stream(self, split: str) -> Tensor:
        if split not in self._streams:
            self._streams[split] = tokenize(
                [self.dir / f"{split}.jsonl"], self.tokenizer, self.dir / "tokens"
            )
        return self._streams[split]

    def tokenize(self, jsonl: Iterable[Union[str, Path]]) -> Tensor:
        return tokenize(list(jsonl), self.tokenizer, self.dir / "tokens")


def save(model: nn.Module, out: Path, data: Data, recipe: Recipe, metrics: Dict[str, Any]) -> None:
    """``save_pretrained`` plus the tokenizer (``PreTrainedTokenizerFast``), recipe.json and metrics.json."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))  # type: ignore[operator]
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(data.tokenizer), eos_token=corpus.EOS, pad_token=corpus.EOS
    )
    tok.save_pretrained(str(out))
    (out / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=1, sort_keys=True) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


def train_reference(
    out: Path,
    recipe: Recipe,
    corpus_dir: Path,
    limit_bytes: Optional[int] = None,
    progress: bool = False,
    eval_tokens: int = 65536,
    vocab_size: int = corpus.VOCAB_SIZE,
) -> Dict[str, Any]:
    """Build the corpus if needed, train a model by ``recipe``, evaluate it on valid, save it to ``out``."""
    data = Data(corpus_dir, limit_bytes=limit_bytes, vocab_size=vocab_size)
    model = build(recipe.size, data.vocab_size, recipe.seed, eos_token_id=data.eos_id, **recipe.routing)
    run = train(model, data.stream("train"), recipe, progress=progress)
    metrics = {
        "train": run,
        "valid": evaluate(model, data.stream("valid"), recipe.size.context, eval_tokens),
        "parameters": parameter_counts(model),
        "corpus": {k: data.manifest[k] for k in ("text_bytes", "files", "python")},
        "machine": machine(),
        "threads": torch.get_num_threads(),
    }
    save(model, out, data, recipe, metrics)
    return metrics


def machine() -> str:
    """The CPU model and count, as lscpu names it."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def ensure_reference(out: Path, recipe: Recipe, corpus_dir: Path, **kwargs: Any) -> Path:
    """``out`` if it holds a model trained by ``recipe``, else train one there first."""
    out = Path(out)
    rp = out / "recipe.json"
    if (
        (out / "config.json").is_file()
        and rp.is_file()
        and Recipe.from_json(json.loads(rp.read_text())) == recipe
    ):
        return out
    train_reference(out, recipe, corpus_dir, **kwargs)
    return out


__all__ = [
    "QUICK_LIMIT_BYTES",
    "REFERENCE_TOKENS",
    "Data",
    "Recipe",
    "batches",
    "default_cache",
    "ensure_reference",
    "evaluate",
    "machine",
    "quick_recipe",
    "reference_recipe",
    "save",
    "tokenize",
    "train",
    "train_reference",
]
