import itertools, json, sys, os
import torch, triton, triton.testing
sys.path.insert(0, ".")
import kernels
dec = sys.modules["kernels.decode_attention"]
ext = sys.modules["kernels.extend_attention"]
from kernels import decode_attention, extend_attention, DecodeWorkspace
BS = 16
SHAPES = {"qwen": (16, 8, 128), "smol": (9, 3, 64)}
DT = torch.bfloat16
res = {"decode": [], "extend": []}
out_dir = os.environ.get("OUT", "/tmp")

def cache(batch, seq, hkv, d):
    nb = batch * (seq // BS)
    kc = torch.randn(nb, BS, hkv, d, device="cuda", dtype=DT); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device="cuda").to(torch.int32).view(batch, -1)
    sl = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    return kc, vc, bt, sl

def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=15)

data = {}
for m, (h, hkv, d) in SHAPES.items():
    for seq in (1024, 4096):
        for b in (1, 16, 64, 256):
            data[(m, seq, b)] = cache(b, seq, hkv, d) + (torch.randn(b, h, d, device="cuda", dtype=DT),)
for bn, w, st in [(16, 2, 3), (32, 2, 3), (32, 4, 3), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (64, 8, 3), (128, 8, 3)]:
    cfg = dec.DecodeLaunchConfig(bn, w, st)
    dec.decode_launch_config = lambda hd, cfg=cfg: cfg
    line = []
    for (m, seq, b), (kc, vc, bt, sl, q) in data.items():
        h, hkv, d = SHAPES[m]
        for s in (1, 2, 4, 8, 16, 32, 64):
            if b * hkv * s > 132 * 64: continue
            ws = DecodeWorkspace.allocate(b, h, s, d, "cuda"); out = torch.empty_like(q)
            try:
                ms = bench(lambda: decode_attention(q, kc, vc, bt, sl, 0.1, out, s, ws))
            except Exception as e:
                print("fail", bn, w, st, repr(e)[:200]); ms = None
            res["decode"].append(dict(bn=bn, w=w, st=st, m=m, seq=seq, b=b, s=s, us=ms and ms * 1e3))
    print("cfg done", bn, w, st, flush=True)
    json.dump(res, open(f"{out_dir}/tune2.json", "w"))
del data
for m, (h, hkv, d) in SHAPES.items():
    for seq in (1024, 4096, 8192):
        kc, vc, bt, sl = cache(1, seq, hkv, d)
        q = torch.randn(seq, h, d, device="cuda", dtype=DT); out = torch.empty_like(q)
        qsl = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
        for bm, bn, w, st in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 2), (64, 32, 4, 2)]:
            cfg = ext.ExtendLaunchConfig(bm, bn, w, st)
            ext.extend_launch_config = lambda hd, cfg=cfg: cfg
            try:
                ms = bench(lambda: extend_attention(q, kc, vc, bt, qsl, sl, 0.1, seq, out))
            except Exception as e:
                print("fail", bm, bn, w, st, type(e).__name__, flush=True); ms = None
            tf = 2 * h * d * seq * seq / ms / 1e9 if ms else None
            res["extend"].append(dict(bm=bm, bn=bn, w=w, st=st, m=m, seq=seq, ms=ms, tflops=tf))
            print("ext", m, seq, bm, bn, w, st, tf and round(tf), flush=True)
json.dump(res, open(f"{out_dir}/tune2.json", "w"))
