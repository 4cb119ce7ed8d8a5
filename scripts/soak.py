#!/usr/bin/env python3
"""Soak test of distattn-bench sp (run through scripts/soak.sh DURATION).

Until DURATION has passed, starts one job after another with a random strategy, rank count,
shape (sequence, heads, KV heads, head dim), dtype, causal mask and forward/backward, each
checked (-c: the first call against the fp64 reference, every later call bit for bit against
the first, so every call's outputs are checked). A job is one long-lived mpirun of many iterations
(about --job-seconds of work, calibrated from a 2-iteration run of the same configuration), so
that a leak per call shows up as growth inside the processes. Every --sample seconds the RSS,
open file descriptors and threads of every rank are read from /proc. After the warm-up
(the first --warmup fraction of a job's samples, at least --min-warmup-s seconds) each rank's
RSS trend (least-squares slope times the judged span, relative to the mean) may grow by at
most --rss-growth (default 1 %), its peak may exceed the first judged sample by at most 5 %,
and its fd and thread counts must not grow at all; a job with fewer than 8 samples after its warm-up is not judged on memory. Any failed check, wrong
result, non-zero exit or hang (a job past 10x its expected time plus 300 s) fails the soak (exit 1).
Prints one line per job and a summary; --log FILE also writes them (and the JSON of each job).
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

STRATEGIES = ["heads", "ring", "zigzag", "ulysses", "allgather", "hybrid"]


def parse_duration(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise SystemExit(f"soak: bad DURATION '{text}' (use e.g. 90, 90s, 30m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def proc_stats(pid):
    """(rss_kib, fds, threads) of a live process, or None once it is gone."""
    try:
        rss = threads = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds, threads
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def pick_config(rng):
    s = rng.choice(STRATEGIES)
    p = rng.choice([2, 4]) if s == "hybrid" else rng.choice([2, 3, 4])
    heads_kv = rng.choice([1, 2, 4])
    heads = heads_kv * rng.choice([1, 2, 4])
    if s in ("ulysses", "hybrid", "heads"):
        heads = max(heads, 4)
        heads_kv = min(heads_kv, heads)
    # A multiple of 2P (zigzag, allgather) and of the hybrid ring's 2R.
    seq = 2 * p * 8 * rng.choice([2, 4, 8, 16])
    return {
        "strategy": s,
        "np": p,
        "seq": seq,
        "heads": heads,
        "kv_heads": heads_kv,
        "dim": rng.choice([32, 64]),
        "dtype": rng.choice(["fp32", "bf16", "fp16"]),
        "causal": rng.choice([0, 1]),
        "backward": rng.choice([0, 1]),
    }


def command(args, cfg, iters, json_path):
    mpi = [args.mpirun, "-n", str(cfg["np"]), "--bind-to", "none"]
    if cfg["np"] > (os.cpu_count() or 1):  # as launch/mpirun.sh: waiting ranks yield
        mpi += ["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
    if os.geteuid() == 0:
        mpi.append("--allow-run-as-root")
    bench = [args.bench, "sp", "--strategy", cfg["strategy"], "-b", str(cfg["seq"]), "-e",
             str(cfg["seq"]), "--heads", str(cfg["heads"]), "--kv-heads", str(cfg["kv_heads"]),
             "--dim", str(cfg["dim"]), "--dtype", cfg["dtype"], "--causal", str(cfg["causal"]),
             "--backward", str(cfg["backward"]), "-c", "-n", str(iters), "-w", "1",
             "--baseline-iters", "0", "--json", json_path]
    return mpi + bench


def run_job(args, cfg, iters, json_path, limit_s):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        os.remove(json_path)
    except FileNotFoundError:
        pass
    t0 = time.monotonic()
    proc = subprocess.Popen(command(args, cfg, iters, json_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    samples = {}  # rank pid -> [(t, rss, fds, threads)]
    hung = False
    while proc.poll() is None:
        # Rank 0 writes the JSON after the last call: later samples see the teardown (the
        # summary, MPI_Finalize, library destructors map and touch memory once), not the
        # steady state of the calls, and are not judged.
        if not os.path.exists(json_path):
            for pid in children(proc.pid):
                st = proc_stats(pid)
                if st is not None and None not in st:
                    samples.setdefault(pid, []).append((time.monotonic() - t0,) + st)
        if time.monotonic() - t0 > limit_s:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(args.sample)
    out = proc.communicate()[0]
    return proc.returncode, out, samples, time.monotonic() - t0, hung


def trend_growth(after):
    """Growth a steady leak would give: the least-squares slope of RSS over time after the
    warm-up, times the judged span, relative to the mean RSS. The allocator's oscillation
    (heap grown and trimmed call by call, +-1.5 % of a 20 MB rank) averages out of it."""
    ts = [s[0] for s in after]
    rs = [s[1] for s in after]
    n = len(ts)
    mt, mr = sum(ts) / n, sum(rs) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var <= 0 or mr <= 0:
        return 0.0
    slope = sum((t - mt) * (r - mr) for t, r in zip(ts, rs)) / var
    return slope * (ts[-1] - ts[0]) / mr


def analyse(samples, warmup, growth_limit, min_warmup_s, peak_limit=0.05):
    """Per rank: RSS at the end of the warm-up (the first `warmup` fraction of the samples, and
    at least `min_warmup_s` seconds: first backward passes, Open MPI's lazy connections and
    the allocator's first growth happen then), the max after it, fd/thread growth, and the
    trend growth (trend_growth), which is judged against growth_limit; the max over the
    warm-up value (max_growth) must stay within peak_limit (a transient that large is not
    allocator noise). A rank with fewer than 8 samples after the warm-up is not judged."""
    ranks = []
    for pid, ss in sorted(samples.items()):
        if len(ss) < 2:
            continue
        w = max(1, int(len(ss) * warmup))
        while w < len(ss) and ss[w][0] < min_warmup_s:
            w += 1
        after = ss[w:]
        if len(after) < 8:
            ranks.append({"judged": False, "samples": len(ss), "rss_kib": ss[-1][1]})
            continue
        base_rss, base_fd, base_thr = after[0][1], after[0][2], after[0][3]
        max_rss = max(s[1] for s in after)
        ranks.append({
            "judged": True,
            "rss_kib": base_rss,
            "rss_max_kib": max_rss,
            "growth": trend_growth(after),
            "max_growth": (max_rss - base_rss) / base_rss if base_rss else 0.0,
            "fd_growth": max(s[2] for s in after) - base_fd,
            "thread_growth": max(s[3] for s in after) - base_thr,
            "samples": len(ss),
            "warmup_s": after[0][0],
        })
    judged = [r for r in ranks if r["judged"]]
    ok = all(r["growth"] <= growth_limit and r["max_growth"] <= peak_limit and
             r["fd_growth"] <= 0 and r["thread_growth"] <= 0 for r in judged)
    return ranks, judged, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("duration", help="how long to soak: 90, 90s, 30m, 2h")
    ap.add_argument("--bench", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--job-seconds", type=float, default=60.0)
    ap.add_argument("--sample", type=float, default=0.5)
    ap.add_argument("--warmup", type=float, default=0.25)
    ap.add_argument("--min-warmup-s", type=float, default=15.0)
    ap.add_argument("--rss-growth", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    total = parse_duration(args.duration)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    logf = open(args.log, "w") if args.log else None
    tmp_json = f"/tmp/distattn-soak-{os.getpid()}.json"

    def say(line):
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    say(f"# soak {args.duration} ({total:.0f} s), seed {seed}, jobs of ~{args.job_seconds:.0f} s, "
        f"RSS growth limit {args.rss_growth * 100:.1f}% after {args.warmup * 100:.0f}% warm-up")
    say("# job strategy  np   seq  H/KV dim dtype causal bwd iters  wall_s  ranks  "
        "rss_MiB  growth%  fd+  thr+  result")
    start = time.monotonic()
    jobs = calls = failures = jobs_judged = 0
    worst = worst_peak = 0.0
    while time.monotonic() - start < total:
        cfg = pick_config(rng)
        # Calibrate: the wall time of 2 and of 12 iterations (startup cancels out), then
        # enough iterations for --job-seconds (at least 20).
        walls = []
        for n in (2, 12):
            rc, out, _, wall, hung = run_job(args, cfg, n, tmp_json, 300)
            if rc != 0 or hung:
                break
            walls.append(wall)
        if len(walls) < 2:
            failures += 1
            say(f"# calibration run failed (exit {rc}{', hung' if hung else ''}): {cfg}\n{out}")
            break
        # The per-call time the bench measured is a floor: on a loaded machine the two walls
        # are noisy enough for their difference to vanish.
        try:
            with open(tmp_json) as f:
                per_call = float(json.load(f)["rows"][0]["time_ms"]) / 1e3
        except (OSError, ValueError, KeyError, IndexError):
            per_call = 0.0
        per_iter = max((walls[1] - walls[0]) / 10.0, 2.0 * per_call, 1e-3)
        left = total - (time.monotonic() - start)
        iters = int(min(50000, max(20, min(args.job_seconds, max(left, 10)) / per_iter)))
        rc, out, samples, wall, hung = run_job(args, cfg, iters, tmp_json,
                                               10 * max(args.job_seconds, wall) + 300)
        jobs += 1
        ranks, judged, mem_ok = analyse(samples, args.warmup, args.rss_growth, args.min_warmup_s)
        # -c checks the first call against fp64 and every later call bit for bit against the
        # first: all iters + 1 (warm-up) calls must be checked, with no mismatch.
        try:
            with open(tmp_json) as f:
                row = json.load(f)["rows"][0]
            n_checked, mismatches = int(row["calls_checked"]), int(row["repeat_mismatches"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            n_checked, mismatches = 0, -1
        checked = ("check vs fp64 reference" in out and ": OK" in out and mismatches == 0 and
                   n_checked == iters + 1)
        ok = rc == 0 and not hung and checked and mem_ok
        calls += max(n_checked, 0)
        jobs_judged += 1 if len(judged) == cfg["np"] else 0
        g = max((r["growth"] for r in judged), default=0.0)
        worst = max(worst, g)
        worst_peak = max([worst_peak] + [r["max_growth"] for r in judged])
        fdg = max((r["fd_growth"] for r in judged), default=0)
        thg = max((r["thread_growth"] for r in judged), default=0)
        rss = max((r["rss_kib"] for r in ranks), default=0) / 1024
        mem = f"{g * 100:12.3f}" if len(judged) == cfg["np"] else f"{'short':>12s}"
        why = "OK" if ok else ("HUNG" if hung else f"FAILED(exit {rc}, check {'ok' if checked else 'missing'}, "
                                                    f"mem {'ok' if mem_ok else 'grew'})")
        say(f"  {jobs:3d} {cfg['strategy']:9s} {cfg['np']:2d} {cfg['seq']:5d} {cfg['heads']:2d}/{cfg['kv_heads']:<2d}"
            f" {cfg['dim']:3d} {cfg['dtype']:5s} {cfg['causal']:6d} {cfg['backward']:3d} {iters:5d}"
            f" {wall:7.1f} {len(ranks):6d} {rss:8.1f} {mem} {fdg:4d} {thg:5d}  {why}")
        if logf:
            logf.write("# " + json.dumps({"config": cfg, "iters": iters, "ranks": ranks}) + "\n")
        if not ok:
            failures += 1
            say(out[-4000:])
    elapsed = time.monotonic() - start
    say(f"# soak: {jobs} jobs, {calls} checked calls in {elapsed:.0f} s, memory judged on "
        f"{jobs_judged} jobs (the others too short after the warm-up), worst RSS trend growth "
        f"after warm-up {worst * 100:.3f}% (peak {worst_peak * 100:.3f}%), failures {failures}: {'PASSED' if failures == 0 else 'FAILED'}")
    try:
        os.remove(tmp_json)
    except FileNotFoundError:
        pass
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
