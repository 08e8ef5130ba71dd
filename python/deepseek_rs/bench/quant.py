"""INT8 quantization measured: accuracy, memory and latency, fp32 against int8 in one run.

``deepseek-rs bench quant [--quick] [--seeds N] [--json PATH]`` (needs scikit-learn, the
``bench`` extra, for the data)

* Accuracy on a real task: handwritten-digit classification (scikit-learn's bundled UCI digits,
  1797 8x8 images, 30% held out) with a small network whose middle block is a ``PEAMoE``
  (with a shared expert). fp32 training, then post-training quantization (PTQ:
  ``convert_int8`` as is) and quantization-aware training (QAT: ``prepare_qat`` on a
  snapshot taken before the last fp32 epochs, those epochs fine-tuned with fake quantization
  instead, ``convert_int8``). The article claims QAT keeps 99.2% of the fp32 accuracy.
* Memory: bytes of the parameters and buffers, fp32 against int8.
* Latency: an ``nn.Linear`` 4096x4096 on 256 rows against ``Int8Linear``, and the ``PEAMoE``
  benchmark layer (H=1024, F=512, E=64, k=6) at T=256 against its int8 conversion.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..moe.layer import PEAMoE
from ..quant import Int8Linear, convert_int8, model_bytes, prepare_qat
from . import common


def digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        PEAMoE(128, 64, 8, router="top_k", top_k=2, shared_intermediate_size=64),
        nn.Linear(128, 10),
    )


def train(model: nn.Module, x, y, epochs: int, lr: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def timed(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool, seeds: int, say: Callable[[str], None]) -> Dict[str, Any]:
    epochs, qat_epochs = (3, 1) if quick else (30, 5)
    out: Dict[str, Any] = {"epochs": epochs, "qat_epochs": qat_epochs, "seeds": []}
    print(
        f"workload: UCI digits, 30% held out, {epochs} epochs (the last {qat_epochs} QAT for QAT); "
        "baseline: PTQ (convert_int8 of the fp32 model); ours: QAT then convert_int8; ratio: % of fp32"
    )
    for seed in range(seeds):
        say(f"training, seed {seed}")
        xtr, ytr, xte, yte = digits(seed)
        # QAT fine-tunes a snapshot taken qat_epochs before the end of the fp32 run, so both
        # see the same number of epochs (QAT's extra training must not count as accuracy).
        base = train(network(seed), xtr, ytr, epochs - qat_epochs, 3e-3, seed)
        qat = train(prepare_qat(copy.deepcopy(base)), xtr, ytr, qat_epochs, 3e-4, seed + 100)
        fp32 = train(base, xtr, ytr, qat_epochs, 3e-4, seed + 100)
        ptq = convert_int8(copy.deepcopy(fp32))
        qat_int8 = convert_int8(qat)
        r = {
            "seed": seed,
            "fp32": accuracy(fp32, xte, yte),
            "ptq_int8": accuracy(ptq, xte, yte),
            "qat_int8": accuracy(qat_int8, xte, yte),
        }
        out["seeds"].append(r)
        print(
            f"seed {seed}: fp32 {r['fp32']:.4f}  PTQ int8 {r['ptq_int8']:.4f}  QAT int8 {r['qat_int8']:.4f}"
        )
    f, pt, qa = (statistics.mean(r[k] for r in out["seeds"]) for k in ("fp32", "ptq_int8", "qat_int8"))
    out["accuracy"] = {
        "fp32": f,
        "ptq_int8": pt,
        "qat_int8": qa,
        "ptq_of_fp32": pt / f,
        "qat_of_fp32": qa / f,
    }
    print("\n== accuracy: UCI digits, 30% held out, mean of", seeds, "seed(s)")
    print(f"fp32 {f:.4f} | PTQ int8 {pt:.4f} ({pt / f:.1%} of fp32)", end="")
    print(f" | QAT int8 {qa:.4f} ({qa / f:.1%} of fp32)")
    print("   article: QAT keeps 99.2% of the fp32 accuracy")

    say("memory")
    print("\n== memory (parameters + buffers)")
    small = network(0)
    b32 = model_bytes(small)
    b8 = model_bytes(convert_int8(small))
    print(f"digits network: fp32 {b32 / 1024:.1f} KiB, int8 {b8 / 1024:.1f} KiB ({b8 / b32:.3f}x)")
    h, ff, e, k, t = (256, 128, 8, 2, 64) if quick else (1024, 512, 64, 6, 256)
    layer = PEAMoE(h, ff, e, router="top_k", top_k=k, renormalize=True).eval()
    layer8 = convert_int8(nn.Sequential(copy.deepcopy(layer)))
    l32, l8 = model_bytes(layer), model_bytes(layer8)
    mib = 2**20
    print(f"PEAMoE H={h} F={ff} E={e}: fp32 {l32 / mib:.1f} MiB, int8 {l8 / mib:.1f} MiB ({l8 / l32:.3f}x)")
    out["memory"] = {"network_fp32": b32, "network_int8": b8, "layer_fp32": l32, "layer_int8": l8}

    say("latency")
    print("\n== latency (best of repeats, same run; ratio: fp32 time / int8 time)")
    n = 512 if quick else 4096
    lin = nn.Linear(n, n)
    lin8 = Int8Linear.from_float(lin)
    xl = torch.randn(256, n)
    xm = torch.randn(t, h)
    repeat = 3 if quick else 20
    with torch.no_grad():
        t32, t8 = timed(lambda: lin(xl), repeat), timed(lambda: lin8(xl), repeat)
        print(f"Linear {n}x{n}, 256 rows: fp32 {t32 * 1e3:.2f} ms, int8 {t8 * 1e3:.2f} ms ({t32 / t8:.2f}x)")
        m32, m8 = timed(lambda: layer(xm), repeat), timed(lambda: layer8(xm), repeat)
        print(f"PEAMoE T={t}: fp32 {m32 * 1e3:.2f} ms, int8 {m8 * 1e3:.2f} ms ({m32 / m8:.2f}x)")
    out["latency"] = [
        {"workload": f"Linear {n}x{n}, 256 rows", "fp32_s": t32, "int8_s": t8, "ratio": t32 / t8},
        {
            "workload": f"PEAMoE H={h} F={ff} E={e} k={k}, T={t}",
            "fp32_s": m32,
            "int8_s": m8,
            "ratio": m32 / m8,
        },
    ]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = common.parser("quant", __doc__)
    p.add_argument("--seeds", type=int, default=3, help="training seeds (default 3; --quick: 1)")
    common.add_json(p)
    args = p.parse_args(argv)
    common.require("sklearn", "the INT8 benchmark's data (UCI digits)")
    machine = common.machine_info()
    print(common.format_machine(machine))
    results = run(args.quick, 1 if args.quick else args.seeds, common.progress("quant", args))
    common.write_json(args.json, machine, args.quick, results)
    return 0
