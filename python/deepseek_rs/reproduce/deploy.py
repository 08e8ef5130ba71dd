"""The deployment row: the article's optimization YAML applied to a transformer served through
``DynamicBatcher``, against the same model in fp32 without batching, under one open-loop load.

Each arm runs in its own child process (``python -m deepseek_rs.reproduce.deploy ARM ...``), so
that its resident memory is its own; the child prints one JSON object.

* model: a Hugging Face Qwen3-MoE causal LM (random weights: latency and memory do not depend on
  them) whose MoE blocks are replaced by ``PEAMoE`` (``deepseek_rs.patch``); a request is a
  sequence of token ids, the answer the next token's logits.
* arms: ``fp32`` (no batching: one request per model call), ``fp32+batching`` (the YAML's
  batching alone) and ``yaml`` (``optimize(model, the article's YAML, device="cpu")``: QAT
  prepared, deployed int8, mixed precision, served through the YAML's dynamic batcher).
* the experts run on the Rust backend in every arm (``DEEPSEEK_RS_EXPERTS_BACKEND=rust``, set by
  the parent): no backend tuning on first calls, the same kernels in each arm.
* load: Poisson arrivals at a fixed rate (``--rate auto``: half of what the fp32 model serves one
  request at a time, measured by the ``fp32`` arm and passed on to the others) for ``--duration``
  seconds; latency from the scheduled arrival to the answer; p50, p99.
* memory: resident set (VmRSS) sampled while serving, its maximum; and the bytes of the model's
  parameters and buffers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..config import parse_config, sample_config_path
from ..moe.hf import patch
from ..optimization import optimize
from ..quant import model_bytes
from ..serving.batcher import DynamicBatcher

ARMS = ("fp32", "fp32+batching", "yaml")
# name -> (hidden, layers, heads, kv heads, experts, expert width, vocab, request tokens)
SIZES = {
    "tiny": (64, 2, 4, 2, 4, 64, 512, 16),
    "small": (512, 4, 8, 4, 16, 512, 8192, 32),
}


def build_model(size: str, seed: int = 0) -> nn.Module:
    """A Qwen3-MoE causal LM of ``SIZES[size]`` with its MoE blocks on ``PEAMoE``, in eval mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hidden, layers, heads, kv, experts, width, vocab, _ = SIZES[size]
    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg.head_dim = hidden // heads
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg)
    patch(model)
    return model.eval()


class NextToken(nn.Module):
    """Serves ``lm``: token ids ``[B, L]`` -> the next token's logits ``[B, vocab]`` (float32)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits[:, -1].float()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def served(arm: str, size: str):
    """(module to serve, batcher options, bytes of the served model's parameters and buffers)."""
    model = build_model(size)
    if arm == "yaml":
        cfg = sample_config_path()
        optimize(model, cfg, stage="train", device="cpu")  # QAT prepared (method: QAT)
        opt = optimize(model, cfg, stage="deploy", device="cpu")  # int8 inference modules
        batching = opt.config.batching
        assert batching is not None
        options: Dict[str, Any] = {"min_size": batching.min_size, "max_size": batching.max_size}
        options["max_queue_delay"] = batching.max_queue_delay_ms / 1000.0
        return NextToken(opt), options, model_bytes(opt)
    if arm == "fp32+batching":
        batching = parse_config(sample_config_path()).batching
        assert batching is not None
        options = {
            "min_size": batching.min_size,
            "max_size": batching.max_size,
            "max_queue_delay": batching.max_queue_delay_ms / 1000.0,
        }
        return NextToken(model), options, model_bytes(model)
    return NextToken(model), {"min_size": 1, "max_size": 1, "max_queue_delay": 0.0}, model_bytes(model)


def open_loop(
    batcher: DynamicBatcher, x: torch.Tensor, rate: float, duration: float, seed: int
) -> Dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``duration`` s; latencies from the scheduled arrival."""
    rng = random.Random(seed)
    latencies: List[float] = []
    rss: List[int] = []
    futures: List[Future] = []
    lock = threading.Lock()

    def done(start: float):
        def record(_f: Future) -> None:
            with lock:
                latencies.append(time.perf_counter() - start)

        return record

    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss.append(rss_bytes())
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    begin = time.perf_counter()
    t = begin
    while t < begin + duration:
        t += rng.expovariate(rate)
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        f = batcher.submit(x)
        f.add_done_callback(done(t))
        futures.append(f)
    for f in futures:
        f.result()
    elapsed = time.perf_counter() - begin
    stop.set()
    sampler.join()
    lat = sorted(latencies)
    return {
        "requests": len(futures),
        "seconds": elapsed,
        "p50_ms": 1e3 * lat[len(lat) // 2],
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "mean_ms": 1e3 * statistics.fmean(lat),
        "rss_max_bytes": max(rss),
        "mean_batch": batcher.metrics()["mean_batch_size"],
    }


def measure(arm: str, size: str, rate: Optional[float], duration: float, seed: int = 0) -> Dict[str, Any]:
    """One arm in this process (``rate`` None: half the single-request capacity, measured here)."""
    torch.manual_seed(seed)
    module, options, nbytes = served(arm, size)
    tokens = SIZES[size][-1]
    x = torch.randint(0, SIZES[size][-2], (tokens,), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        # every batch size the batcher can form, twice: the experts' backend is tuned per shape class
        # on first calls, which must not land in the timings
        for rows in (1, 2, 4, 8, 16, 32, 1):
            for _ in range(2):
                module(x[None].expand(rows, -1).contiguous())
        times = []
        for _ in range(15):
            t = time.perf_counter()
            module(x[None])
            times.append(time.perf_counter() - t)
    single = statistics.median(times)
    if rate is None:
        rate = 0.5 / single
    floor = 20 if size == "tiny" else 100  # requests, if an arm's minute allows
    duration = max(duration, min(60.0, floor / rate))
    with DynamicBatcher(module, collate="stack", item_shape=(tokens,), dtype=torch.int64, **options) as b:
        b.submit(x).result()
        load = open_loop(b, x, rate, duration, seed)
    return {
        "arm": arm,
        "size": size,
        "tokens_per_request": tokens,
        "rate": rate,
        "duration": duration,
        "single_request_ms": 1e3 * single,
        "model_bytes": nbytes,
        "batcher": options,
        "threads": torch.get_num_threads(),
        **load,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_rs.reproduce.deploy", description=__doc__.split("\n")[0]
    )
    p.add_argument("arm", choices=ARMS)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--rate", default="auto", help="arrivals per second, or auto")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = None if args.rate == "auto" else float(args.rate)
    print(json.dumps(measure(args.arm, args.size, rate, args.duration)))
    return 0


__all__ = ["ARMS", "SIZES", "NextToken", "build_model", "main", "measure", "open_loop", "served"]

if __name__ == "__main__":
    sys.exit(main())
