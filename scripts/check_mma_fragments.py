#!/usr/bin/env python3
"""Host emulation of the tensor-core fragment choreography of the CUDA attention kernels.

Emulates `ldmatrix.x4` (plain and .trans: lane l addresses row l % 8 of matrix l / 8; thread
i receives row i / 4, columns 2(i % 4), 2(i % 4) + 1 of each 8x8 matrix, or the transpose)
and `mma.m16n8k16` (A row-major, B column-major, fp32 C) per the PTX ISA, and drives them
with the shared-memory address formulas of kernels/cuda/flash_fwd_mma.cuh and
kernels/cuda/flash_bwd_mma.cuh (copied by hand: keep them in sync when the kernels change)
for one warp: S = Q K^T and O = P V (forward), S^T, dP^T, dV, dK (dK/dV kernel), S, dP, dQ
(dQ kernel). Each product is compared with NumPy; exits 1 on a mismatch. This checks index
algebra only, without a GPU; it proves nothing about timing, synchronization or rounding.
"""
import sys
try:
    import numpy as np
except ImportError:
    print("skipped: NumPy is not installed")
    sys.exit(0)

def ldm(smem, stride, addr, trans=False):
    # addr(lane) -> element offset of the row that lane provides; returns regs[lane][4] of (lo, hi)
    regs = [[None]*4 for _ in range(32)]
    for mi in range(4):
        rows = [smem[addr(mi*8+r): addr(mi*8+r)+8] for r in range(8)]
        M = np.array(rows)  # 8x8 stored
        for i in range(32):
            if not trans:
                regs[i][mi] = (M[i//4, 2*(i%4)], M[i//4, 2*(i%4)+1])
            else:
                regs[i][mi] = (M[2*(i%4), i//4], M[2*(i%4)+1, i//4])
    return regs

def mma(C, A, B0, B1):
    # C: list[32] of [c0..c3]; A: list[32] of 4 (lo,hi); B0/B1: list[32] of (lo,hi)
    Am = np.zeros((16,16)); Bm = np.zeros((16,8)); Cm = np.zeros((16,8))
    for l in range(32):
        g, t = l//4, l%4
        a = A[l]
        Am[g, 2*t:2*t+2] = a[0]; Am[g+8, 2*t:2*t+2] = a[1]
        Am[g, 2*t+8:2*t+10] = a[2]; Am[g+8, 2*t+8:2*t+10] = a[3]
        Bm[2*t:2*t+2, g] = B0[l]; Bm[2*t+8:2*t+10, g] = B1[l]
        Cm[g, 2*t:2*t+2] = C[l][0:2]; Cm[g+8, 2*t:2*t+2] = C[l][2:4]
    Cm = Cm + Am @ Bm
    for l in range(32):
        g, t = l//4, l%4
        C[l] = [Cm[g,2*t], Cm[g,2*t+1], Cm[g+8,2*t], Cm[g+8,2*t+1]]

def gather_c(C, nblocks):
    out = np.zeros((16, 8*nblocks))
    for nb in range(nblocks):
        for l in range(32):
            g, t = l//4, l%4
            out[g, nb*8+2*t:nb*8+2*t+2] = C[nb][l][0:2]
            out[g+8, nb*8+2*t:nb*8+2*t+2] = C[nb][l][2:4]
    return out

def run(D, Dv, BN, warp):
    rng = np.random.default_rng(D + Dv + BN + warp)
    QS = KS = D + 8; VS = Dv + 8
    BM = 64
    Q = rng.standard_normal((BM, D)); K = rng.standard_normal((BN, D)); V = rng.standard_normal((BN, Dv))
    def to_smem(M, stride):
        s = np.zeros(M.shape[0]*stride); 
        for r in range(M.shape[0]): s[r*stride:r*stride+M.shape[1]] = M[r]
        return s
    Qs, Ks, Vs = to_smem(Q, QS), to_smem(K, KS), to_smem(V, VS)
    # forward: qf
    qf = [ldm(Qs, QS, lambda lane, kk=kk: (warp*16 + lane%16)*QS + kk*16 + (lane//16)*8) for kk in range(D//16)]
    s = [[[0.0]*4 for _ in range(32)] for _ in range(BN//8)]
    for kk in range(D//16):
        for nb2 in range(BN//16):
            kf = ldm(Ks, KS, lambda lane: (nb2*16 + (lane//16)*8 + lane%8)*KS + kk*16 + ((lane//8)%2)*8)
            mma(s[2*nb2], qf[kk], [r[0] for r in kf], [r[1] for r in kf])
            mma(s[2*nb2+1], qf[kk], [r[2] for r in kf], [r[3] for r in kf])
    S = gather_c(s, BN//8)
    # P = S (use S itself as P to test the PV wiring)
    o = [[[0.0]*4 for _ in range(32)] for _ in range(Dv//8)]
    for kk in range(BN//16):
        pa = [[(s[2*kk][l][0], s[2*kk][l][1]), (s[2*kk][l][2], s[2*kk][l][3]), (s[2*kk+1][l][0], s[2*kk+1][l][1]), (s[2*kk+1][l][2], s[2*kk+1][l][3])] for l in range(32)]
        for db2 in range(Dv//16):
            vf = ldm(Vs, VS, lambda lane: (kk*16 + lane%8 + ((lane//8)%2)*8)*VS + db2*16 + (lane//16)*8, trans=True)
            mma(o[2*db2], pa, [r[0] for r in vf], [r[1] for r in vf])
            mma(o[2*db2+1], pa, [r[2] for r in vf], [r[3] for r in vf])
    O = gather_c(o, Dv//8)

    fwd = {"S": np.abs(S - Q[warp * 16:warp * 16 + 16] @ K.T).max(), "O": np.abs(O - S @ V).max()}
    if D != Dv:  # the backward kernels take D == Dv only
        return fwd
    # backward dkdv: warp's 16 keys x BM2 rows
    BM2 = 32; S_ = KS
    Q2 = rng.standard_normal((BM2, D)); DO = rng.standard_normal((BM2, Dv))
    Qs2, DOs = to_smem(Q2, S_), to_smem(DO, S_)
    st = [[[0.0]*4 for _ in range(32)] for _ in range(BM2//8)]
    dpt = [[[0.0]*4 for _ in range(32)] for _ in range(BM2//8)]
    for kk in range(D//16):
        ka = ldm(Ks, S_, lambda lane: (warp*16 + lane%16)*S_ + kk*16 + (lane//16)*8)
        va = ldm(Vs, S_, lambda lane: (warp*16 + lane%16)*S_ + kk*16 + (lane//16)*8)
        for nb2 in range(BM2//16):
            off = lambda lane: (nb2*16 + (lane//16)*8 + lane%8)*S_ + kk*16 + ((lane//8)%2)*8
            qb = ldm(Qs2, S_, off); db = ldm(DOs, S_, off)
            mma(st[2*nb2], ka, [r[0] for r in qb], [r[1] for r in qb]); mma(st[2*nb2+1], ka, [r[2] for r in qb], [r[3] for r in qb])
            mma(dpt[2*nb2], va, [r[0] for r in db], [r[1] for r in db]); mma(dpt[2*nb2+1], va, [r[2] for r in db], [r[3] for r in db])
    Kw = K[warp*16:warp*16+16]; Vw = V[warp*16:warp*16+16]
    ST = gather_c(st, BM2//8); DPT = gather_c(dpt, BM2//8)
    dv = [[[0.0]*4 for _ in range(32)] for _ in range(D//8)]
    dk = [[[0.0]*4 for _ in range(32)] for _ in range(D//8)]
    for kk in range(BM2//16):
        pa = [[(st[2*kk][l][0], st[2*kk][l][1]), (st[2*kk][l][2], st[2*kk][l][3]), (st[2*kk+1][l][0], st[2*kk+1][l][1]), (st[2*kk+1][l][2], st[2*kk+1][l][3])] for l in range(32)]
        sa = [[(dpt[2*kk][l][0], dpt[2*kk][l][1]), (dpt[2*kk][l][2], dpt[2*kk][l][3]), (dpt[2*kk+1][l][0], dpt[2*kk+1][l][1]), (dpt[2*kk+1][l][2], dpt[2*kk+1][l][3])] for l in range(32)]
        for db2 in range(D//16):
            off = lambda lane: (kk*16 + lane%8 + ((lane//8)%2)*8)*S_ + db2*16 + (lane//16)*8
            of = ldm(DOs, S_, off, True); qf2 = ldm(Qs2, S_, off, True)
            mma(dv[2*db2], pa, [r[0] for r in of], [r[1] for r in of]); mma(dv[2*db2+1], pa, [r[2] for r in of], [r[3] for r in of])
            mma(dk[2*db2], sa, [r[0] for r in qf2], [r[1] for r in qf2]); mma(dk[2*db2+1], sa, [r[2] for r in qf2], [r[3] for r in qf2])
    # dq kernel: warp rows of Q (BM=64) vs K/V tile: S = Q K^T, dP = dO V^T, dQ += dS K
    DO3 = rng.standard_normal((BM, Dv)); DOs3 = to_smem(DO3, S_)
    s3 = [[[0.0]*4 for _ in range(32)] for _ in range(BN//8)]; dp3 = [[[0.0]*4 for _ in range(32)] for _ in range(BN//8)]
    for kk in range(D//16):
        qa = ldm(Qs, S_, lambda lane: (warp*16 + lane%16)*S_ + kk*16 + (lane//16)*8)
        da = ldm(DOs3, S_, lambda lane: (warp*16 + lane%16)*S_ + kk*16 + (lane//16)*8)
        for nb2 in range(BN//16):
            off = lambda lane: (nb2*16 + (lane//16)*8 + lane%8)*S_ + kk*16 + ((lane//8)%2)*8
            kb = ldm(Ks, S_, off); vb = ldm(Vs, S_, off)
            mma(s3[2*nb2], qa, [r[0] for r in kb], [r[1] for r in kb]); mma(s3[2*nb2+1], qa, [r[2] for r in kb], [r[3] for r in kb])
            mma(dp3[2*nb2], da, [r[0] for r in vb], [r[1] for r in vb]); mma(dp3[2*nb2+1], da, [r[2] for r in vb], [r[3] for r in vb])
    S3 = gather_c(s3, BN//8); DP3 = gather_c(dp3, BN//8)
    dq = [[[0.0]*4 for _ in range(32)] for _ in range(D//8)]
    for kk in range(BN//16):
        sa = [[(dp3[2*kk][l][0], dp3[2*kk][l][1]), (dp3[2*kk][l][2], dp3[2*kk][l][3]), (dp3[2*kk+1][l][0], dp3[2*kk+1][l][1]), (dp3[2*kk+1][l][2], dp3[2*kk+1][l][3])] for l in range(32)]
        for db2 in range(D//16):
            kf = ldm(Ks, S_, lambda lane: (kk*16 + lane%8 + ((lane//8)%2)*8)*S_ + db2*16 + (lane//16)*8, True)
            mma(dq[2*db2], sa, [r[0] for r in kf], [r[1] for r in kf]); mma(dq[2*db2+1], sa, [r[2] for r in kf], [r[3] for r in kf])

    return {
        "S": np.abs(S - Q[warp * 16:warp * 16 + 16] @ K.T).max(),
        "O": np.abs(O - S @ V).max(),
        "S^T": np.abs(ST - Kw @ Q2.T).max(),
        "dP^T": np.abs(DPT - Vw @ DO.T).max(),
        "dV": np.abs(gather_c(dv, D // 8) - ST @ DO).max(),
        "dK": np.abs(gather_c(dk, D // 8) - DPT @ Q2).max(),
        "dQ": np.abs(gather_c(dq, D // 8) - DP3 @ K).max(),
    }


errors = {}
# (D, Dv, key tile) of the forward instantiations; the backward formulas run at D = Dv.
for D, Dv, BN in ((64, 64, 64), (128, 128, 64), (192, 128, 32)):
    for warp in (0, 3):
        for name, err in run(D, Dv, BN, warp).items():
            if D == Dv or name in ("S", "O"):
                errors[f"{name} D={D} Dv={Dv} BN={BN} warp={warp}"] = err
bad = {k: v for k, v in errors.items() if not v < 1e-9}
print("FAILED: " + str(bad) if bad else f"OK: {len(errors)} fragment products match")
sys.exit(1 if bad else 0)
