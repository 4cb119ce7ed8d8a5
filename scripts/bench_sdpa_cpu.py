#!/usr/bin/env python3
"""CPU peer of `distattn-bench attn`: PyTorch's CPU scaled_dot_product_attention (torch >= 2.0,
its flash kernel) and distattn's CPU kernels on the same shapes, in the same run, as ratios.

For every (dtype, causal, seq) case the script times SDPA forward and forward+backward
(contiguous BHSD inputs, the layout SDPA is fastest on), then runs `distattn-bench attn
--op fwd` and `--op bwd` as subprocesses with the same shapes and threads, and prints
speed = PyTorch time / distattn time (> 1: distattn is faster). distattn's fwd+bwd is its
forward plus its backward. The two sides alternate case by case so both see the same load.
FLOPs as distattn counts them: 4*B*H*S*S*D forward (S*(S+1)/2 pairs when causal), 2.5x
that for the backward. --gemm-ceiling adds the GEMM rates of the same machine (torch.matmul,
fp32 and bf16); --decode-seqs adds decode rows (distattn's KV GB/s against a tensor copy).

PyTorch from PyPI (about 5 GB with its CUDA libraries) belongs in a benchmark venv, not in
CI: python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install torch numpy.
Prints a '#'-prefixed table and writes JSON with --json. Exits 0 with "skipped: ..." when
PyTorch >= 2.0 is missing.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="4096", help="comma-separated S (Sq = Sk)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--causal", default="0,1", help="comma-separated 0/1")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("-w", "--warmup", type=int, default=1)
    p.add_argument("-n", "--iters", type=int, default=3)
    p.add_argument("--distattn-bench", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "build", "bin", "distattn-bench"),
        help="distattn-bench binary ('' = PyTorch only)")
    p.add_argument("--gemm-ceiling", action="store_true",
                   help="also time torch.matmul 2048^3 in fp32 and bf16 (oneDNN) and print "
                        "each case's GFLOP/s as a fraction of its dtype's GEMM rate")
    p.add_argument("--decode-seqs", default="",
                   help="also run distattn-bench attn --op decode at these cache lengths "
                        "(32 query / 8 KV heads, D 128, fp32 and bf16 caches) and print KV "
                        "GB/s against the memory copy bandwidth (1 GiB tensor copy)")
    p.add_argument("--json", default=None, help="write results to this file")
    return p.parse_args()


def gemm_gflops(torch, dt, n=2048, iters=5):
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    for _ in range(2):
        torch.matmul(a, b)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(ts) / 1e9


def copy_gbps(torch, nbytes=1 << 30, iters=5):
    """Read + write bytes per second of one tensor copy (the decode kernel's ceiling)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2.0 * nbytes / min(ts) / 1e9


def flops(b, h, s, d, causal):
    pairs = s * (s + 1) / 2 if causal else s * s
    return 4.0 * b * h * pairs * d


def time_torch(torch, fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_distattn(binary, op, dtype, args, s, causal, extra=()):
    """distattn-bench reports the mean of its -n timed iterations; returns (row, kernel)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [binary, "attn", "--op", op, "-d", dtype, "--batch", str(args.batch),
           "-b", str(s), "-e", str(s), "-n", str(args.iters), "-w", str(args.warmup),
           "--json", path]
    cmd += list(extra) if extra else ["--heads", str(args.heads), "--dim", str(args.dim)]
    if causal:
        cmd.append("--causal")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        with open(path) as fh:
            doc = json.load(fh)
    finally:
        os.unlink(path)
    rows = doc["rows"] if isinstance(doc, dict) and "rows" in doc else doc
    row = [x for x in rows if isinstance(x, dict) and "time_ms" in x][-1]
    kernel = doc.get("header", {}).get("cpu_kernel", "?") if isinstance(doc, dict) else "?"
    return row, kernel


def main():
    args = parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        print(f"skipped: PyTorch is not available ({e})")
        return 0
    major = int(torch.__version__.split(".")[0])
    if major < 2 or not hasattr(F, "scaled_dot_product_attention"):
        print(f"skipped: torch {torch.__version__} has no scaled_dot_product_attention (>= 2.0)")
        return 0
    torch.set_num_threads(args.threads)
    binary = args.distattn_bench
    if binary and not os.path.exists(binary):
        print(f"# {binary} not found: PyTorch only (pass --distattn-bench)")
        binary = ""
    dts = {"fp32": torch.float32, "bf16": torch.bfloat16}
    B, H, D = args.batch, args.heads, args.dim
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    print(f"# PyTorch {torch.__version__} CPU SDPA vs distattn-bench attn; cpu '{cpu}', "
          f"threads {args.threads}, B={B} H={H} D={D}, warmup {args.warmup}, iters {args.iters}")
    ceil = {}
    if args.gemm_ceiling:
        ceil = {d: gemm_gflops(torch, dts[d]) for d in ("fp32", "bf16")}
        print(f"# GEMM 2048^3 (torch.matmul): fp32 {ceil['fp32']:.1f} GFLOP/s, bf16 "
              f"{ceil['bf16']:.1f} GFLOP/s")
    print(f"# {'dtype':>5} {'causal':>6} {'seq':>6} {'case':>7} {'torch_ms':>10} "
          f"{'distattn_ms':>11} {'speed':>6} {'torch_GF/s':>10} {'dist_GF/s':>9} "
          f"{'vs_gemm':>7} kernel")
    results = []
    for dname in args.dtypes.split(","):
        dt = dts[dname]
        for causal in [bool(int(c)) for c in args.causal.split(",")]:
            for s in [int(x) for x in args.seqs.split(",")]:
                g = torch.Generator().manual_seed(0)
                q, k, v, do = (torch.randn(B, H, s, D, generator=g).to(dt) for _ in range(4))

                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

                def fwd_bwd():
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                    o.backward(do)
                    qg.grad = kg.grad = vg.grad = None

                cases = [("fwd", fwd)] + ([] if args.no_backward else [("fwd+bwd", fwd_bwd)])
                t_d = {}
                kernel = "-"
                if binary:
                    row_f, kernel = time_distattn(binary, "fwd", dname, args, s, causal)
                    t_d["fwd"] = row_f["time_ms"] / 1e3
                    if not args.no_backward:
                        row_b, _ = time_distattn(binary, "bwd", dname, args, s, causal)
                        t_d["fwd+bwd"] = t_d["fwd"] + row_b["time_ms"] / 1e3
                for name, fn in cases:
                    t_t = time_torch(torch, fn, args.warmup, args.iters)
                    f = flops(B, H, s, D, causal) * (3.5 if name == "fwd+bwd" else 1.0)
                    td = t_d.get(name)
                    row = {"dtype": dname, "causal": causal, "seq": s, "case": name,
                           "torch_ms": t_t * 1e3, "torch_gflops": f / t_t / 1e9,
                           "distattn_ms": None if td is None else td * 1e3,
                           "distattn_gflops": None if td is None else f / td / 1e9,
                           "speed": None if td is None else t_t / td, "cpu_kernel": kernel,
                           "threads": args.threads, "torch": torch.__version__}
                    if ceil and td is not None:
                        row["gemm_gflops"] = ceil[dname]
                        row["vs_gemm"] = row["distattn_gflops"] / ceil[dname]
                    results.append(row)
                    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
                    print(f"  {dname:>5} {int(causal):>6} {s:>6} {name:>7} {t_t * 1e3:>10.1f} "
                          f"{fmt(row['distattn_ms'], '>11.1f'):>11} "
                          f"{fmt(row['speed'], '>6.2f'):>6} {row['torch_gflops']:>10.1f} "
                          f"{fmt(row['distattn_gflops'], '>9.1f'):>9} "
                          f"{fmt(row.get('vs_gemm'), '>7.2f'):>7} {kernel}")
                    sys.stdout.flush()
    decode = []
    if args.decode_seqs and binary:
        bw = copy_gbps(torch)
        print(f"# decode: memory copy bandwidth (1 GiB tensor copy, read + write) {bw:.1f} GB/s")
        print(f"# {'cache':>5} {'seq':>7} {'kv_GB/s':>8} {'vs_copy':>7} kernel")
        for dname in args.dtypes.split(","):
            for s in [int(x) for x in args.decode_seqs.split(",")]:
                row, kernel = time_distattn(
                    binary, "decode", dname, args, s, False,
                    ["--heads", "32", "--kv-heads", "8", "--dim", "128"])
                r = {"case": "decode", "dtype": dname, "seq": s, "kv_gbps": row["kv_gbps"],
                     "copy_gbps": bw, "vs_copy": row["kv_gbps"] / bw, "cpu_kernel": kernel}
                decode.append(r)
                print(f"  {dname:>5} {s:>7} {r['kv_gbps']:>8.2f} {r['vs_copy']:>7.2f} {kernel}")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu, "gemm_gflops": ceil, "rows": results, "decode": decode},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
