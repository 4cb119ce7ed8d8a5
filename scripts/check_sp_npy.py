#!/usr/bin/env python3
"""Round trip `distattn-bench sp --inputs/--outputs` against a pure-Python fp64 attention.

Needs only the Python standard library (no NumPy): .npy files are written and read by hand
(format version 1.0/2.0, '<f4', C order). Writes random float32 q, k, v, dout
([B, S, H, D] = [1, 48, 4, 16], GQA with 2 KV heads), runs
  mpirun -np N <bench> sp --strategy S --causal {0,1} --inputs IN --outputs OUT
for every strategy at N = 2 and 4, causal and not, reads out.npy, lse.npy, dq.npy, dk.npy,
dv.npy back and asserts max |distattn - reference| <= 1e-5 * max |reference| for each of
them. The scatter into each strategy's layout and the gather back to global order are part
of what is tested.

usage: check_sp_npy.py --bench PATH [--mpiexec mpirun] [--np 2,4] [--keep DIR]
Exit codes: 0 pass, 1 mismatch or a failed/timed-out run.
"""
import argparse
import ast
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time

B, S, HQ, HKV, D = 1, 48, 4, 2, 16
TOL = 1e-5
STRATEGIES = ["heads", "ring", "zigzag", "ulysses", "allgather", "hybrid"]
RUN_TIMEOUT_S = 120


def save_npy(path, shape, data):
    """float32 C-order .npy, format 1.0 (header padded so the data starts 64-byte aligned)."""
    dims = ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "")
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % dims
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(struct.pack("<%df" % len(data), *data))


def load_npy(path):
    """(shape, flat list of floats) of a little-endian float32 C-order .npy file."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:6] != b"\x93NUMPY":
        raise ValueError("%s: not a .npy file" % path)
    major = blob[6]
    if major == 1:
        hlen, start = struct.unpack("<H", blob[8:10])[0], 10
    else:
        hlen, start = struct.unpack("<I", blob[8:12])[0], 12
    header = ast.literal_eval(blob[start:start + hlen].decode("latin1"))
    if header["descr"] != "<f4" or header["fortran_order"]:
        raise ValueError("%s: expected '<f4' C order, got %r" % (path, header))
    shape = tuple(header["shape"])
    n = 1
    for s in shape:
        n *= s
    data = blob[start + hlen:]
    if len(data) != 4 * n:
        raise ValueError("%s: %d data bytes for shape %r" % (path, len(data), shape))
    return shape, list(struct.unpack("<%df" % n, data))


def reference(q, k, v, dout, causal):
    """fp64 attention (B = 1): out [S, HQ, D], lse [HQ, S] (natural log), dq, dk, dv."""
    group = HQ // HKV
    scale = 1.0 / math.sqrt(D)
    out = [0.0] * (S * HQ * D)
    lse = [0.0] * (HQ * S)
    dq = [0.0] * (S * HQ * D)
    dk = [0.0] * (S * HKV * D)
    dv = [0.0] * (S * HKV * D)
    krow = lambda t, j, h: t[(j * HKV + h) * D:(j * HKV + h + 1) * D]
    for h in range(HQ):
        kh = h // group
        for i in range(S):
            qi = q[(i * HQ + h) * D:(i * HQ + h + 1) * D]
            keys = range(i + 1) if causal else range(S)
            s = [scale * sum(a * b for a, b in zip(qi, krow(k, j, kh))) for j in keys]
            m = max(s)
            e = [math.exp(x - m) for x in s]
            l = sum(e)
            p = [x / l for x in e]
            lse[h * S + i] = m + math.log(l)
            o = [0.0] * D
            for pj, j in zip(p, keys):
                vj = krow(v, j, kh)
                for x in range(D):
                    o[x] += pj * vj[x]
            out[(i * HQ + h) * D:(i * HQ + h + 1) * D] = o
            do = dout[(i * HQ + h) * D:(i * HQ + h + 1) * D]
            delta = sum(a * b for a, b in zip(do, o))
            for pj, j in zip(p, keys):
                vj, kj = krow(v, j, kh), krow(k, j, kh)
                ds = pj * (sum(a * b for a, b in zip(do, vj)) - delta) * scale
                for x in range(D):
                    dq[(i * HQ + h) * D + x] += ds * kj[x]
                    dk[(j * HKV + kh) * D + x] += ds * qi[x]
                    dv[(j * HKV + kh) * D + x] += pj * do[x]
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


EXPECTED_SHAPES = {"out": (B, S, HQ, D), "lse": (B, HQ, S), "dq": (B, S, HQ, D),
                   "dk": (B, S, HKV, D), "dv": (B, S, HKV, D)}


def compare(outdir, ref):
    """List of failure strings (empty: all outputs within TOL) and a summary line."""
    fails, parts = [], []
    for name in ("out", "lse", "dq", "dk", "dv"):
        path = os.path.join(outdir, name + ".npy")
        try:
            shape, got = load_npy(path)
        except (OSError, ValueError, SyntaxError) as e:
            fails.append("%s: %s" % (name, e))
            continue
        if shape != EXPECTED_SHAPES[name]:
            fails.append("%s: shape %r, expected %r" % (name, shape, EXPECTED_SHAPES[name]))
            continue
        r = ref[name]
        if any(math.isnan(x) or math.isinf(x) for x in got):
            fails.append("%s: NaN/Inf in output" % name)
            continue
        rel = max(abs(a - b) for a, b in zip(got, r)) / max(abs(b) for b in r)
        parts.append("%s %.1e" % (name, rel))
        if not rel <= TOL:
            fails.append("%s: max rel err %.3e > %.0e" % (name, rel, TOL))
    return fails, ", ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default=os.environ.get("DISTATTN_BENCH", "build/bin/distattn-bench"))
    ap.add_argument("--mpiexec", default=shutil.which("mpirun") or "mpirun")
    ap.add_argument("--np", default="2,4", help="comma-separated rank counts")
    ap.add_argument("--keep", default="", help="keep inputs/outputs in this directory")
    args = ap.parse_args()
    if not os.path.exists(args.bench):
        print("FAIL: bench not found: %s (pass --bench)" % args.bench)
        return 1

    rng = random.Random(20261123)
    sizes = {"q": HQ, "k": HKV, "v": HKV, "dout": HQ}
    # Rounded to float32 so the reference sees exactly what the bench reads.
    tensors = {n: list(struct.unpack("<%df" % (S * h * D),
                                     struct.pack("<%df" % (S * h * D),
                                                 *[rng.uniform(-1.0, 1.0)
                                                   for _ in range(S * h * D)])))
               for n, h in sizes.items()}
    t0 = time.time()
    refs = {c: reference(tensors["q"], tensors["k"], tensors["v"], tensors["dout"], causal=c)
            for c in (True, False)}
    print("# fp64 references (causal and not, B=%d S=%d Hq=%d Hkv=%d D=%d): %.1f s"
          % (B, S, HQ, HKV, D, time.time() - t0))

    work = args.keep or tempfile.mkdtemp(prefix="distattn_sp_npy_")
    indir = os.path.join(work, "in")
    os.makedirs(indir, exist_ok=True)
    for n, h in sizes.items():
        save_npy(os.path.join(indir, n + ".npy"), (B, S, h, D), tensors[n])

    flags = ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DISTATTN_COMM_TIMEOUT_S", "60")

    failures = 0
    runs = 0
    cases = [(np_, causal, strategy) for np_ in [int(x) for x in args.np.split(",") if x]
             for causal in (True, False) for strategy in STRATEGIES]
    for np_, causal, strategy in cases:
        outdir = os.path.join(work, "out_%s_np%d_c%d" % (strategy, np_, causal))
        shutil.rmtree(outdir, ignore_errors=True)
        cmd = [args.mpiexec, "-np", str(np_)] + flags + [
            args.bench, "sp", "--strategy", strategy, "--causal", str(int(causal)),
            "--inputs", indir, "--outputs", outdir]
        label = "%-9s np%d %-10s" % (strategy, np_, "causal" if causal else "non-causal")
        runs += 1
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print("FAIL %s: timed out after %d s: %s" % (label, RUN_TIMEOUT_S, " ".join(cmd)))
            failures += 1
            continue
        if proc.returncode != 0:
            print("FAIL %s: exit %d: %s\n%s" % (label, proc.returncode, " ".join(cmd),
                                                proc.stdout.decode(errors="replace")[-2000:]))
            failures += 1
            continue
        fails, summary = compare(outdir, refs[causal])
        if fails:
            failures += 1
            print("FAIL %s: %s (%s)" % (label, "; ".join(fails), " ".join(cmd)))
        else:
            print("ok   %s  %.1f s  max rel err: %s" % (label, time.time() - t0, summary))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("%d of %d runs failed" % (failures, runs) if failures else "all %d runs passed" % runs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
