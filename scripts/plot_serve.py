#!/usr/bin/env python3
"""PNG plots of distattn-serve results (the lists that `distattn-serve --json FILE` writes).

    /usr/bin/python3 scripts/plot_serve.py sweep.json [more.json ...] --out docs/serving

writes, into --out:
  ttft_cdf.png        CDF of every completed request's TTFT, one curve per (mode, rate)
  tpot_cdf.png        the same for TPOT
  slo_attainment.png  fraction of requests meeting every --goodput SLO vs request rate, per
                      mode (when the runs hold more than one rate)
  itl_p99.png         p99 inter-token latency vs request rate, per mode

Uses Debian's python3-matplotlib (apt-get install python3-matplotlib), no other package.
"""
import argparse
import json
import math
import os
import sys


def load(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if not isinstance(data, list):
            sys.exit(f"{p}: expected a JSON list (distattn-serve --json)")
        runs += [r for r in data if r.get("mode") in ("disagg", "colocated")]
    if not runs:
        sys.exit("no disagg/colocated runs in the input")
    return runs


def rate_of(run):
    r = run.get("rate")
    return math.inf if r in (None, "inf") else float(r)


def label(run):
    r = rate_of(run)
    rate = "all at once" if math.isinf(r) else f"{r:g} req/s"
    return (f"{run['mode']} {run['prefill_ranks']}+{run['decode_ranks']} "
            f"{run['prefill_sharding']}/{run['decode_sharding']}, {rate}")


def cdf(ax, runs, key, title, unit):
    for run in runs:
        v = sorted(run.get(key, []))
        if not v:
            continue
        y = [(i + 1) / len(v) for i in range(len(v))]
        ax.step(v, y, where="post", label=label(run))
    ax.set_xlabel(f"{title} ({unit})")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="distattn-serve --json outputs")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load(args.json)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for key, title, name in (("requests_ttft_ms", "TTFT", "ttft_cdf.png"),
                             ("requests_tpot_ms", "TPOT", "tpot_cdf.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cdf(ax, runs, key, title, "ms")
        ax.set_title(f"{title} CDF")
        if title == "TTFT":
            ax.set_xscale("log")
        path = os.path.join(args.out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    modes = sorted({r["mode"] for r in runs})
    finite = [r for r in runs if not math.isinf(rate_of(r))]
    if len({rate_of(r) for r in finite}) > 1:
        for key, ylabel, name, pct in (("slo_attainment", "requests meeting every SLO",
                                        "slo_attainment.png", True),
                                       ("itl_ms", "p99 ITL (ms)", "itl_p99.png", False)):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for mode in modes:
                pts = sorted((rate_of(r), r[key]["p99"] if not pct else r[key])
                             for r in finite if r["mode"] == mode)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(ylabel)
            if pct:
                ax.set_ylim(0, 1.05)
                slo = finite[0]
                ax.set_title(f"SLO attainment (TTFT <= {slo.get('slo_ttft_ms')} ms, "
                             f"TPOT <= {slo.get('slo_tpot_ms')} ms)")
            else:
                ax.set_yscale("log")
                ax.set_title("p99 inter-token latency")
            ax.grid(alpha=0.3)
            ax.legend()
            path = os.path.join(args.out, name)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    for p in written:
        print(f"[plot_serve] wrote {p}")


if __name__ == "__main__":
    main()
