#!/usr/bin/env python3
"""Print the tables of docs/reference-model.md from the experiments' JSON results.

    python3 scripts/lm_report.py docs/lm-results/*.json

Every number printed is read from the JSON files; nothing is typed by hand.
"""

import json
import sys
from pathlib import Path


def ms(s, digits=2, pct=False):
    if pct:
        return f"{100 * s['mean']:+.{digits}f}% ± {100 * s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def pea(r):
    rows = [
        "| arm | valid perplexity | experts/token (valid) | experts/token (train) | tokens | "
        "Δ compute vs top-2 | Δ perplexity vs top-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in r["arms"].items():
        vs = a.get("vs_top_k2")
        rows.append(
            f"| {name} | {ms(a['valid_perplexity'])} | {ms(a['valid_experts_per_token'])} | "
            f"{ms(a['train_experts_per_token'])} | {a['tokens']['mean']:.0f} | "
            + (
                f"{ms(vs['compute_change'], 1, True)} | {ms(vs['perplexity_change'], 1, True)} |"
                if vs
                else "— | — |"
            )
        )
    return "\n".join(rows)


def filt(r):
    raw = r["arms"]["raw"]
    keys = [k for k in raw if k.endswith(("perplexity", "accuracy")) and isinstance(raw[k], dict)]
    rows = [
        "| training data | tokens in the stream | "
        + " | ".join(keys)
        + " | "
        + " | ".join(f"Δ {k} vs raw" for k in keys if k.endswith("perplexity"))
        + " |",
        "|---" * (2 + len(keys) + len([k for k in keys if k.endswith("perplexity")])) + "|",
    ]
    for name, a in r["arms"].items():
        vs = a.get("vs_raw", {k: None for k in keys if k.endswith("perplexity")})
        stream = a["runs"][0]["train_stream_tokens"]
        rows.append(
            f"| {name} | {stream} | "
            + " | ".join(ms(a[k], 4 if k.endswith("accuracy") else 2) for k in keys)
            + " | "
            + " | ".join("—" if vs[k] is None else ms(vs[k], 1, True) for k in keys if k in vs)
            + " |"
        )
    return "\n".join(rows)


def int8(r):
    rows = ["| model | valid perplexity | next-token accuracy |", "|---|---|---|"]
    for name, a in r["arms"].items():
        if isinstance(a.get("accuracy"), dict):
            rows.append(f"| {name} | {ms(a['perplexity'])} | {ms(a['accuracy'], 4)} |")
        else:
            rows.append(f"| {name} | {a['perplexity']:.2f} | {a['accuracy']:.4f} |")
    rows += ["", "| accuracy kept | value |", "|---|---|"]
    for name, v in r["accuracy_kept"].items():
        rows.append(
            f"| {name} | "
            + (
                f"{100 * v:.2f}%"
                if isinstance(v, float)
                else f"{100 * v['mean']:.2f}% ± {100 * v['std']:.2f}"
            )
            + " |"
        )
    return "\n".join(rows)


def main(paths):
    for p in paths:
        r = json.loads(Path(p).read_text())
        print(f"### {r['experiment']} ({p})\n")
        print(
            f"Command: `{r['command']}`; seeds {r['seeds']}; budget {r['budget']}; "
            f"machine {r['machine']}, {r['threads']} threads; {r['seconds'] / 60:.1f} min.\n"
        )
        print({"pea": pea, "filter": filt, "int8": int8}[r["experiment"]](r))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
