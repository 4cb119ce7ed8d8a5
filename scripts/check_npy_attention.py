#!/usr/bin/env python3
"""Round trip `distattn-bench attn --inputs/--outputs` against a NumPy fp64 attention.

Writes random q, k, v, dout (.npy, float32 [B, S, H, D]), runs the bench for several
(op, dtype, mask) cases, and asserts max |distattn - numpy| <= tol * max |numpy| for every
output (out, lse, and dq, dk, dv for bwd). Inputs are rounded to the run dtype before the
NumPy reference so the comparison measures the kernels, not the input rounding.

usage: check_npy_attention.py [--bench PATH]   (default: $DISTATTN_BENCH, build/bin/...)
Exit codes: 0 pass, 1 mismatch or bench failure, 77 skipped (NumPy not installed).
"""
import argparse
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:
    print("skipped: numpy is not installed (pip install numpy)")
    sys.exit(77)

TOL = {"fp32": 2e-5, "bf16": 2e-2, "fp16": 5e-3}


def round_to(x, dtype):
    """float32 array rounded to the storage dtype (round to nearest even), back in float32."""
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)
    return x.astype(np.float32)


def attention(q, k, v, dout, causal):
    """fp64 forward (out, lse) and backward (dq, dk, dv); queries at the end of the keys."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1.0 / np.sqrt(D)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if causal:
        qpos = (Sk - Sq) + np.arange(Sq)
        visible = np.arange(Sk)[None, :] <= qpos[:, None]
        s = np.where(visible[None, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(l > 0, e / l, 0.0)
        lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(l[..., 0]), -np.inf)
    out = np.einsum("bhqk,bkhd->bqhd", p, vv)
    res = {"out": out, "lse": lse}
    if dout is not None:
        do = dout.astype(np.float64)
        dp = np.einsum("bqhd,bkhd->bhqk", do, vv)
        ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
        res["dq"] = np.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
        dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
        dv = np.einsum("bhqk,bqhd->bkhd", p, do)
        res["dk"] = dk.reshape(B, Sk, Hkv, g, D).sum(axis=3)
        res["dv"] = dv.reshape(B, Sk, Hkv, g, v.shape[3]).sum(axis=3)
    return res


def run_case(bench, tmp, seed, op, dtype, causal, shape):
    B, Sq, Sk, Hq, Hkv, D = shape
    rng = np.random.default_rng(seed)
    arrays = {
        "q": rng.uniform(-1, 1, (B, Sq, Hq, D)).astype(np.float32),
        "k": rng.uniform(-1, 1, (B, Sk, Hkv, D)).astype(np.float32),
        "v": rng.uniform(-1, 1, (B, Sk, Hkv, D)).astype(np.float32),
    }
    if op == "bwd":
        arrays["dout"] = rng.uniform(-1, 1, (B, Sq, Hq, D)).astype(np.float32)
    ind, outd = os.path.join(tmp, "in"), os.path.join(tmp, "out")
    for d in (ind, outd):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
    for name, a in arrays.items():
        np.save(os.path.join(ind, name + ".npy"), a)
    cmd = [bench, "attn", "--op", op, "--dtype", dtype, "--inputs", ind, "--outputs", outd]
    if causal:
        cmd.append("--causal")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        print("FAILED to run:", " ".join(cmd), "\n", r.stdout, r.stderr)
        return False
    rounded = {n: round_to(a, dtype) for n, a in arrays.items()}
    ref = attention(rounded["q"], rounded["k"], rounded["v"], rounded.get("dout"), causal)
    ok = True
    for name, want in ref.items():
        got = np.load(os.path.join(outd, name + ".npy")).astype(np.float64)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        finite = np.isfinite(want)
        if not np.array_equal(np.isfinite(got), finite) or np.any(got[~finite] != want[~finite]):
            print(f"FAILED {op} {dtype} causal={causal} {name}: NaN/Inf pattern differs")
            ok = False
            continue
        err = np.max(np.abs(got[finite] - want[finite]), initial=0.0)
        scale = np.max(np.abs(want[finite]), initial=0.0)
        # lse is fp32 whatever the storage dtype.
        tol = (TOL["fp32"] if name == "lse" else TOL[dtype]) * max(scale, 1e-30)
        status = "ok" if err <= tol else "FAILED"
        ok = ok and err <= tol
        print(f"{status:6} {op:6} {dtype} causal={int(causal)} {name:3} shape={list(want.shape)} "
              f"max_abs_err={err:.3e} max_ref={scale:.3e} limit={tol:.3e}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default=os.environ.get("DISTATTN_BENCH", "build/bin/distattn-bench"))
    args = ap.parse_args()
    if not os.path.exists(args.bench):
        print(f"bench binary '{args.bench}' not found (pass --bench or set DISTATTN_BENCH)")
        return 1
    cases = [  # op, dtype, causal, (B, Sq, Sk, Hq, Hkv, D)
        ("fwd", "fp32", True, (2, 37, 37, 4, 2, 32)),
        ("fwd", "bf16", False, (1, 20, 45, 2, 2, 64)),
        ("fwd", "fp16", True, (1, 50, 50, 3, 1, 16)),
        ("bwd", "fp32", True, (2, 29, 29, 4, 2, 32)),
        ("bwd", "fp32", False, (1, 17, 33, 2, 1, 24)),
        ("decode", "fp32", True, (2, 3, 300, 8, 2, 64)),
    ]
    with tempfile.TemporaryDirectory(prefix="distattn_npy_") as tmp:
        results = [run_case(args.bench, tmp, i, *c) for i, c in enumerate(cases)]
    print("OK" if all(results) else "FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
