"""GVRT measured: a byte-level language model on real text with injected gradient spikes.

``deepseek-rs bench gvrt [--quick] [--seeds N] [--steps N] [--spike-p P] [--burst START:END:P]
[--out DIR] [--no-plot] [--json PATH]`` (the plot needs matplotlib, the ``bench`` extra)

* Data: the Python standard library's own source (every ``*.py`` directly under the directory
  of ``os``, sorted by name, concatenated), read as bytes: 90% for training, the last 10% held
  out. It ships with every Python, so the run needs no network.
* Model: a neural probabilistic language model (Bengio et al. 2003): the previous 16 bytes,
  each embedded in 16 dimensions, through a 2-layer MLP (256 wide) to the next byte's logits
  (small, so that 12 training runs fit in a few minutes on 2 shared cores).
* Training: AdamW (lr 3e-3, weight decay 0.01), batch 64, linear warm-up then cosine decay
  (a ``LambdaLR`` scheduler, the same for every method).
* Injected spikes: each step is corrupted with probability 2% (the same steps for every method
  of a seed): its batch is replaced by uniformly random bytes and its loss multiplied by 100, a
  stand-in for a data bug or a mis-scaled loss that produces a gradient-norm spike.
* Methods: no clipping; a fixed clipping threshold (``clip_grad_norm_(max_norm=1.0)``, the usual
  LLM default); GVRT with its defaults; GVRT with ``adapt_lr=False`` (clipping alone, as ZClip),
  to separate the two halves of GVRT; GVRT with ``clip="zscore"`` (clip to mean + z*std instead
  of ZClip's adaptive threshold). And the same run without corrupted batches ("clean data", no
  clipping): the loss the spikes took away.
* ``--burst START:END:P``: steps START to END-1 are corrupted with probability P instead, a
  surge of bad batches (the case the learning-rate half of GVRT is for).
* Reported: held-out loss (bits per byte) at the end and along the run, mean and spread over
  seeds; the steps each method clipped, and how many of the corrupted steps among them; the PNG
  plot of the held-out loss curves (``DIR/gvrt_loss.png``, ``DIR/gvrt_loss_burst.png`` with
  ``--burst``).
"""

from __future__ import annotations

import glob
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..training.gvrt import GVRT
from . import common

CONTEXT = 16
# name -> GVRT keyword arguments (None: no GVRT)
METHODS = {
    "clean data": None,
    "no clipping": None,
    "fixed clip 1.0": None,
    "GVRT": {},
    "GVRT, clip only": {"adapt_lr": False},
    'GVRT, "zscore"': {"clip": "zscore"},
}


def stdlib_bytes(limit: int) -> torch.Tensor:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    data = bytearray()
    for path in files:
        with open(path, "rb") as f:
            data += f.read()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


def windows(data: torch.Tensor, starts: torch.Tensor):
    idx = starts.unsqueeze(1) + torch.arange(CONTEXT + 1)
    w = data[idx]
    return w[:, :CONTEXT], w[:, CONTEXT]


class NPLM(nn.Module):
    def __init__(self, embed: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.mlp = nn.Sequential(
            nn.Linear(CONTEXT * embed, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).flatten(1))


@torch.no_grad()
def held_out_bits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    loss = sum(
        nn.functional.cross_entropy(model(xb), yb, reduction="sum")
        for xb, yb in zip(x.split(2048), y.split(2048))
    )
    model.train()
    return float(loss) / len(y) / math.log(2)


def train(
    method: str,
    seed: int,
    train_data,
    eval_xy,
    steps: int,
    eval_every: int,
    spike_p: float,
    gvrt=None,
    burst=None,
):
    torch.manual_seed(seed)
    model = NPLM()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gvrt = METHODS.get(method) if gvrt is None else gvrt
    opt = inner if gvrt is None else GVRT(inner, **gvrt)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(1000 + seed)  # batches and corruptions: same for every method
    curve, norms, factors, clipped, clipped_corrupted = [], [], [], 0, 0
    trace = []  # GVRT only: per step, its learning-rate factor, bound and clip threshold
    for step in range(steps):
        x, y = windows(train_data, torch.randint(0, len(train_data) - CONTEXT - 1, (64,), generator=g))
        p = burst[2] if burst is not None and burst[0] <= step < burst[1] else spike_p
        corrupt = torch.rand((), generator=g).item() < p and method != "clean data"
        noise = torch.randint(0, 256, (64, CONTEXT + 1), generator=g)
        scale = 1.0
        if corrupt:
            x, y, scale = noise[:, :CONTEXT], noise[:, CONTEXT], 100.0
        loss = nn.functional.cross_entropy(model(x), y) * scale
        opt.zero_grad()
        loss.backward()
        before = clipped
        if method == "fixed clip 1.0":
            norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            clipped += norm > 1.0
        opt.step()
        sched.step()
        if isinstance(opt, GVRT):
            last = opt.last
            norm = last.grad_norm
            factors.append(last.lr_factor)
            clipped = last.clipped_steps
            bound = None if last.mean is None or last.std is None else last.mean + opt.z_threshold * last.std
            trace.append(
                {"lr_factor": last.lr_factor, "grad_norm": norm, "bound": bound, "clip": last.clip_threshold}
            )
        elif method in ("no clipping", "clean data"):
            norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
        clipped_corrupted += corrupt and clipped > before
        norms.append((norm, corrupt))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, held_out_bits(model, *eval_xy)))
    return curve, norms, factors, clipped, clipped_corrupted, trace


def plot(results, steps: int, seeds: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method in METHODS:
        runs = [results[method][s][0] for s in range(seeds)]
        xs = [x for x, _ in runs[0]]
        mean = [statistics.mean(r[i][1] for r in runs) for i in range(len(xs))]
        style = {"linestyle": "--", "color": "gray"} if method == "clean data" else {}
        ax.plot(xs, mean, label=method, linewidth=1.6, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (bits per byte)")
    ax.set_title(f"byte-level LM on Python stdlib source, {title} (mean of {seeds} seeds)")
    ax.title.set_fontsize(9)
    lo = min(min(v for _, v in results[m][s][0]) for m in METHODS for s in range(seeds))
    ax.set_ylim(lo - 0.1, lo + 2.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def run(
    steps: int,
    seeds: int,
    spike_p: float,
    burst,
    quick: bool,
    say: Callable[[str], None],
) -> Dict[str, Any]:
    eval_every = max(1, steps // 12)
    data = stdlib_bytes(400_000 if quick else 4_000_000)
    split = int(0.9 * len(data))
    train_data, test_data = data[:split], data[split:]
    eval_starts = torch.randint(
        0,
        len(test_data) - CONTEXT - 1,
        (512 if quick else 2048,),
        generator=torch.Generator().manual_seed(7),
    )
    eval_xy = windows(test_data, eval_starts)
    print(
        f"workload: {len(data) / 1e6:.1f} MB of Python {sys.version.split()[0]} stdlib source; "
        f"{steps} steps, batch 64, {spike_p:.0%} corrupted batches (random bytes, loss x100), {seeds} seed(s)"
        + (f"; steps {burst[0]}-{burst[1] - 1}: {burst[2]:.0%} corrupted" if burst else "")
    )
    print("baselines: no clipping, fixed clip 1.0; ours: GVRT and its halves; clean data: the loss to reach")

    results: Dict[str, List[Any]] = {m: [] for m in METHODS}
    start = time.perf_counter()
    for seed in range(seeds):
        for method in METHODS:
            say(f"seed {seed}: {method}")
            results[method].append(
                train(method, seed, train_data, eval_xy, steps, eval_every, spike_p, burst=burst)
            )
        spikes = sum(c for _, c in results["no clipping"][seed][1])
        finals = "  ".join(f"{m}: {results[m][seed][0][-1][1]:.3f}" for m in METHODS)
        print(f"seed {seed} ({spikes} corrupted steps): final held-out bits/byte  {finals}")
    print(f"({time.perf_counter() - start:.0f} s)")

    print(f"\n== held-out loss, bits per byte, mean +- std over {seeds} seed(s)")
    quarter = [max(1, len(results["no clipping"][0][0]) * k // 4) - 1 for k in (1, 2, 3, 4)]
    steps_at = [results["no clipping"][0][0][i][0] for i in quarter]
    print(
        f"{'method':<17}| "
        + " | ".join(f"step {s:>5}" for s in steps_at)
        + " | final (+- std)   | clipped steps (corrupted) | mean lr factor | final / no clipping"
    )
    reference = statistics.mean(r[0][-1][1] for r in results["no clipping"])
    rows = []
    for method in METHODS:
        runs = results[method]
        cells = [statistics.mean(r[0][i][1] for r in runs) for i in quarter]
        finals = [r[0][-1][1] for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        clipped = statistics.mean(r[3] for r in runs)
        clipped_corrupted = statistics.mean(r[4] for r in runs)
        factors = [f for r in runs for f in r[2]]
        lr = f"{statistics.mean(factors):.3f}" if factors else "1 (none)"
        mean = statistics.mean(finals)
        print(
            f"{method:<17}| "
            + " | ".join(f"{c:>10.3f}" for c in cells)
            + f" | {mean:.3f} (+- {sd:.3f}) | {clipped:>8.1f} ({clipped_corrupted:.1f})"
            + f"{'':>11} | {lr:>14} | {mean / reference:.3f}"
        )
        rows.append(
            {
                "method": method,
                "final_bits": finals,
                "final_mean": mean,
                "final_std": sd,
                "ratio_to_no_clipping": mean / reference,
                "curve": [
                    (s, statistics.mean(r[0][i][1] for r in runs)) for i, (s, _) in enumerate(runs[0][0])
                ],
                "clipped_steps": [r[3] for r in runs],
                "clipped_corrupted_steps": [r[4] for r in runs],
                "mean_lr_factor": statistics.mean(factors) if factors else None,
            }
        )
    clean = [n for r in results["no clipping"] for n, c in r[1] if not c]
    spiky = [n for r in results["no clipping"] for n, c in r[1] if c]
    print(
        f"\ngradient norm without clipping: median {statistics.median(clean):.3f} on clean steps"
        + (f", median {statistics.median(spiky):.1f} on corrupted steps" if spiky else "")
    )
    return {
        "steps": steps,
        "seeds": seeds,
        "spike_p": spike_p,
        "burst": burst,
        "corrupted_steps": [sum(c for _, c in r[1]) for r in results["no clipping"]],
        "rows": rows,
        "grad_norm_median_clean": statistics.median(clean),
        "grad_norm_median_corrupted": statistics.median(spiky) if spiky else None,
        "_curves": results,  # for the plot; not written to JSON
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("gvrt", __doc__)
    p.add_argument("--seeds", type=int, default=3, help="training seeds (default 3; --quick: 1)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600; --quick: 40)")
    p.add_argument(
        "--spike-p", type=float, default=0.02, help="probability that a step's batch is corrupted (0.02)"
    )
    p.add_argument(
        "--burst",
        metavar="START:END:P",
        help="a stretch of steps [START, END) whose batches are corrupted with probability P",
    )
    common.add_out(p)
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG of the held-out loss curves")
    common.add_json(p)
    args = p.parse_args(argv)
    burst = None
    if args.burst:
        try:
            start, end, prob = args.burst.split(":")
            burst = (int(start), int(end), float(prob))
        except ValueError:
            p.error(f"--burst takes START:END:P (two integers and a probability), got {args.burst!r}")
    if not args.no_plot and not common.has_module("matplotlib"):
        raise common.MissingExtra("matplotlib", "the GVRT benchmark's plot", "pass --no-plot")
    steps, seeds = (40, 1) if args.quick else (args.steps, args.seeds)
    spike_p = max(args.spike_p, 0.1) if args.quick else args.spike_p  # a few corrupted steps even in 40
    torch.set_num_threads(1)  # small models: one thread is faster, and steady on a shared machine
    machine = common.machine_info()
    print(common.format_machine(machine))
    results = run(steps, seeds, spike_p, burst, args.quick, common.progress("gvrt", args))
    curves = results.pop("_curves")
    if not args.no_plot:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "gvrt_loss_burst.png" if burst else "gvrt_loss.png")
        title = f"steps {burst[0]}-{burst[1] - 1} {burst[2]:.0%} corrupted" if burst else None
        plot(curves, steps, seeds, path, title or f"{spike_p:.0%} corrupted batches")
        results["plot"] = path
    common.write_json(args.json, machine, args.quick, results)
    return 0
