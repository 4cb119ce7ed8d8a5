#!/usr/bin/env python3
"""Times PyTorch scaled_dot_product_attention (flash and cuDNN backends) on this GPU, for
comparison with `distattn-bench attn --device cuda` (docs/PERFORMANCE.md, "CUDA kernels").

Shapes follow issue 6: bf16, BSHD inputs [batch, seq, heads, 128], S = 4K..32K, causal and
not, forward and forward+backward (backward time = fwd+bwd minus fwd). FLOPs as distattn
counts them (REFERENCE.md): 4*B*H*S*S*D forward, exact visible pairs when causal
(S*(S+1)/2 per head), backward 2.5x forward.

Prints a '#'-prefixed table and writes JSON with --json. Exits 0 with "skipped: ..." when
PyTorch or a GPU is missing.
"""
import argparse
import json
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="4096,8192,16384,32768", help="comma-separated S")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", default="flash,cudnn", help="flash,cudnn,efficient,math")
    p.add_argument("-w", "--warmup", type=int, default=3)
    p.add_argument("-n", "--iters", type=int, default=10)
    p.add_argument("--json", default=None, help="write results to this file")
    return p.parse_args()


def attention_flops(b, h, s, d, causal):
    pairs = s * (s + 1) / 2 if causal else s * s
    return 4.0 * b * h * pairs * d


def main():
    args = parse_args()
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        print(f"skipped: PyTorch with torch.nn.attention is not available ({e})")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no GPU")
        return 0
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    dev = torch.device("cuda")
    B, H, D = args.batch, args.heads, args.head_dim
    results = []
    print(f"# device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"bf16, B={B} H={H} D={D}, warmup {args.warmup}, iters {args.iters}")
    print(f"# {'backend':>8} {'seq':>7} {'causal':>6} {'fwd_ms':>9} {'fwd_TF/s':>9} "
          f"{'bwd_ms':>9} {'bwd_TF/s':>9}")

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / args.iters

    for name in args.backends.split(","):
        backend = backends[name]
        for s in (int(x) for x in args.seqs.split(",")):
            for causal in (False, True):
                # SDPA takes [B, H, S, D]; transposing a BSHD tensor gives the same memory
                # layout distattn uses.
                q, k, v = (torch.randn(B, s, H, D, device=dev, dtype=torch.bfloat16)
                           .transpose(1, 2).requires_grad_(True) for _ in range(3))
                dout = torch.randn(B, s, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
                row = {"backend": name, "batch": B, "heads": H, "head_dim": D, "seq": s,
                       "causal": causal, "dtype": "bf16"}
                try:
                    with sdpa_kernel([backend]):
                        fwd = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=causal))

                        def fwd_bwd():
                            o = torch.nn.functional.scaled_dot_product_attention(
                                q, k, v, is_causal=causal)
                            o.backward(dout)
                        both = timed(fwd_bwd)
                except RuntimeError as e:
                    row["error"] = str(e).splitlines()[0]
                    print(f"# {name:>8} {s:>7} {str(causal):>6} unavailable: {row['error']}")
                    results.append(row)
                    continue
                fl = attention_flops(B, H, s, D, causal)
                bwd = both - fwd
                row.update({"fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": fl / fwd / 1e9,
                            "bwd_tflops": 2.5 * fl / bwd / 1e9 if bwd > 0 else None})
                results.append(row)
                bwd_tf = f"{row['bwd_tflops']:9.1f}" if row["bwd_tflops"] else f"{'-':>9}"
                print(f"  {name:>8} {s:>7} {str(causal):>6} {fwd:9.3f} {row['fwd_tflops']:9.1f} "
                      f"{bwd:9.3f} {bwd_tf}")
                del q, k, v, dout
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
