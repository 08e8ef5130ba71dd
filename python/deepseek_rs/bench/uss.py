"""USS measured: text-to-image retrieval on real handwritten digits with descriptive captions.

``deepseek-rs bench uss [--quick] [--seeds N] [--steps N] [--json PATH]`` (needs scikit-learn,
the ``bench`` extra, for the data)

* Data: scikit-learn's bundled UCI digits (1797 8x8 images, offline), 30% held out (stratified).
  Each image gets a caption of its label and of three properties measured on the image itself,
  each cut at the data set's tertiles: the amount of ink (light / medium / bold), the width
  (narrow / average / wide: spread of the ink across columns) and the slant (left-slanted /
  upright / right-slanted: the ink's row-column covariance), e.g. "a bold narrow right-slanted
  seven". 270 possible captions, so a caption names a few images, not a whole class. Text
  features: the caption's bag of words; image features: the 64 pixel intensities.
* Methods, same embedding width (64), encoder (2 residual MLP blocks), optimizer (AdamW 2e-3),
  batch (128) and steps, learnable temperature in every loss:
  two-tower: a separate encoder per modality, symmetric InfoNCE alone (CLIP's recipe);
  USS: ``UnifiedSemanticSpace`` (one shared encoder) with ``USSLoss`` (0.7 InfoNCE + 0.3
  consistency); USS without its consistency term, to separate the shared encoder from the loss.
* Measured: text-to-image Recall@1/5/10 on the held-out set (each test caption ranks all test
  images; a hit is its own image), trained on the full training split and on 250 pairs (the
  article claims USS needs less fine-tuning data). Captions shared by several images cap the
  achievable recall; the ceiling (a model that ranks the images with the query's exact caption
  first, in random order) is printed beside it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from ..training.uss import UnifiedSemanticSpace, USSLoss
from . import common

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK, WIDTH, SLANT = (
    ("light", "medium", "bold"),
    ("narrow", "average", "wide"),
    ("left-slanted", "upright", "right-slanted"),
)
METHODS = ("two-tower", "USS", "USS, no consistency")
DIM = 64


def tertile(values: torch.Tensor) -> torch.Tensor:
    cuts = values.quantile(torch.tensor([1 / 3, 2 / 3], dtype=values.dtype))
    return torch.bucketize(values, cuts)


def captioned_digits():
    """Images [N, 64] in [0, 1], captions (strings) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.data, dtype=torch.float64) / 16.0
    ink = images.view(-1, 8, 8)
    mass = ink.sum((1, 2))
    rows, cols = torch.meshgrid(
        torch.arange(8.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64), indexing="ij"
    )
    r_mean = (ink * rows).sum((1, 2)) / mass
    c_mean = (ink * cols).sum((1, 2)) / mass
    width = ((ink * (cols - c_mean[:, None, None]) ** 2).sum((1, 2)) / mass).sqrt()
    # Rows grow downwards: ink further right at the top (negative covariance) slants right.
    cov = (ink * (rows - r_mean[:, None, None]) * (cols - c_mean[:, None, None])).sum((1, 2)) / mass
    slant = -cov
    ink_t, width_t, slant_t = tertile(mass), tertile(width), tertile(slant)
    captions = [
        f"a {INK[a]} {WIDTH[b]} {SLANT[c]} {WORDS[y]}"
        for a, b, c, y in zip(ink_t.tolist(), width_t.tolist(), slant_t.tolist(), d.target.tolist())
    ]
    return images.float(), captions, torch.tensor(d.target)


def bag_of_words(captions):
    vocab = sorted({w for c in captions for w in c.split()})
    index = {w: i for i, w in enumerate(vocab)}
    x = torch.zeros(len(captions), len(vocab))
    for row, c in enumerate(captions):
        for w in c.split():
            x[row, index[w]] = 1.0
    return x


def recall_at(text_emb: torch.Tensor, image_emb: torch.Tensor, ks=(1, 5, 10)):
    sim = text_emb @ image_emb.T
    positive = sim.diagonal().unsqueeze(1)
    rank = (sim > positive).sum(1)
    return [(rank < k).float().mean().item() for k in ks]


def ceiling(captions, ks=(1, 5, 10)):
    """Expected recall of a ranking that puts the images with the exact caption first, randomly."""
    counts = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    return [statistics.mean(min(1.0, k / counts[c]) for c in captions) for k in ks]


def train(method: str, seed: int, xt, xi, steps: int):
    torch.manual_seed(seed)
    dims = {"text": xt.shape[1], "image": xi.shape[1]}
    if method == "two-tower":
        towers = {m: UnifiedSemanticSpace({m: w}, dim=DIM, depth=2, mlp_ratio=2) for m, w in dims.items()}
        loss_fn = USSLoss(consistency_weight=0.0, contrastive_weight=1.0)
        params = [*towers["text"].parameters(), *towers["image"].parameters()]

        def embed(x, m):
            return towers[m](x, m)
    else:
        space = UnifiedSemanticSpace(dims, dim=DIM, depth=2, mlp_ratio=2)
        loss_fn = (
            USSLoss(space) if method == "USS" else USSLoss(consistency_weight=0.0, contrastive_weight=1.0)
        )
        params = list(space.parameters())

        def embed(x, m):
            return space(x, m)

    opt = torch.optim.AdamW([*params, *loss_fn.parameters()], lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    n = xt.shape[0]
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[: min(128, n)]
        loss = loss_fn(embed(xt[idx], "text"), embed(xi[idx], "image"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return embed


def run(steps: int, seeds: int, say: Callable[[str], None]) -> Dict[str, Any]:
    from sklearn.model_selection import train_test_split

    images, captions, labels = captioned_digits()
    text = bag_of_words(captions)
    print(
        f"workload: UCI digits, {len(captions)} images, {len(set(captions))} distinct captions, "
        f"{text.shape[1]}-word vocabulary; e.g. {captions[0]!r}, {captions[7]!r}"
    )
    print("baseline: two-tower (CLIP's recipe); ours: USS; ratio: USS R@10 / two-tower R@10")
    start = time.perf_counter()
    results: Dict[Any, List[List[float]]] = {}
    for seed in range(seeds):
        tr, te = train_test_split(
            torch.arange(len(labels)).numpy(), test_size=0.3, random_state=seed, stratify=labels.numpy()
        )
        tr, te = torch.as_tensor(tr), torch.as_tensor(te)
        test_captions = [captions[i] for i in te.tolist()]
        results.setdefault("ceiling", []).append(ceiling(test_captions))
        small = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))[:250]]
        for size, subset in (("full", tr), ("250 pairs", small)):
            for method in METHODS:
                say(f"seed {seed}, {size}: {method}")
                embed = train(method, seed, text[subset], images[subset], steps)
                with torch.no_grad():
                    r = recall_at(embed(text[te], "text"), embed(images[te], "image"))
                results.setdefault((size, method), []).append(r)
        print(f"seed {seed}: " + "  ".join(f"{m} R@10 {results[('full', m)][-1][2]:.3f}" for m in METHODS))
    print(f"({time.perf_counter() - start:.0f} s)")

    n_train = len(labels) - round(0.3 * len(labels))
    print(
        f"\n== text-to-image recall on the held-out images ({len(te)}), "
        f"mean +- std over {seeds} seed(s), {steps} steps"
    )
    print(
        f"{'training pairs':<15}| {'method':<20}| {'R@1':>6} | {'R@5':>6} | {'R@10':>15} | R@10 / two-tower"
    )
    rows = []
    for size in ("full", "250 pairs"):
        label = f"{n_train} (all)" if size == "full" else size
        base = statistics.mean(r[2] for r in results[(size, "two-tower")])
        for method in METHODS:
            runs = results[(size, method)]
            m = [statistics.mean(r[i] for r in runs) for i in range(3)]
            sd = statistics.stdev(r[2] for r in runs) if len(runs) > 1 else 0.0
            print(
                f"{label:<15}| {method:<20}| {m[0]:>6.3f} | {m[1]:>6.3f} | {m[2]:>6.3f} (+- {sd:.3f}) "
                f"| {m[2] / base:.3f}"
            )
            rows.append(
                {
                    "pairs": size,
                    "method": method,
                    "recall_at_1": m[0],
                    "recall_at_5": m[1],
                    "recall_at_10": m[2],
                    "recall_at_10_std": sd,
                    "recall_at_10_per_seed": [r[2] for r in runs],
                    "ratio_to_two_tower": m[2] / base,
                }
            )
    c = [statistics.mean(r[i] for r in results["ceiling"]) for i in range(3)]
    print(f"{'ceiling':<15}| {'exact-caption order':<20}| {c[0]:>6.3f} | {c[1]:>6.3f} | {c[2]:>6.3f}")
    print("   article: USS raises text-to-image Recall@10 from 67.3% (two-tower) to 82.1%")
    return {
        "steps": steps,
        "seeds": seeds,
        "images": len(captions),
        "distinct_captions": len(set(captions)),
        "test_images": len(te),
        "rows": rows,
        "ceiling": {"recall_at_1": c[0], "recall_at_5": c[1], "recall_at_10": c[2]},
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("uss", __doc__)
    p.add_argument("--seeds", type=int, default=3, help="training seeds (default 3; --quick: 1)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600; --quick: 20)")
    common.add_json(p)
    args = p.parse_args(argv)
    common.require("sklearn", "the USS benchmark's data (UCI digits)")
    steps, seeds = (20, 1) if args.quick else (args.steps, args.seeds)
    torch.set_num_threads(1)  # small models: one thread is faster, and steady on a shared machine
    machine = common.machine_info()
    print(common.format_machine(machine))
    results = run(steps, seeds, common.progress("uss", args))
    common.write_json(args.json, machine, args.quick, results)
    return 0
