import itertools, json, sys, time, os
import torch, triton, triton.testing
sys.path.insert(0, ".")
import kernels
dec = sys.modules["kernels.decode_attention"]
ext = sys.modules["kernels.extend_attention"]
from kernels import decode_attention, extend_attention, DecodeWorkspace, choose_num_kv_splits
BS = 16
SHAPES = {"qwen": (16, 8, 128), "smol": (9, 3, 64)}
DT = torch.bfloat16
SMS = torch.cuda.get_device_properties(0).multi_processor_count
res = {"decode": [], "splits": [], "extend": []}

def cache(batch, seq, hkv, d):
    nb = batch * (seq // BS)
    kc = torch.randn(nb, BS, hkv, d, device="cuda", dtype=DT); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device="cuda").to(torch.int32).view(batch, -1)
    sl = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    return kc, vc, bt, sl

def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=20)

mode = sys.argv[1]
if mode in ("decode", "all"):
    data = {}
    for m, (h, hkv, d) in SHAPES.items():
        for seq in (1024, 4096):
            for b in (1, 16, 64, 256):
                data[(m, seq, b)] = cache(b, seq, hkv, d) + (torch.randn(b, h, d, device="cuda", dtype=DT),)
    for bn, w, st in itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
        cfg = dec.DecodeLaunchConfig(bn, w, st)
        dec.decode_launch_config = lambda hd, cfg=cfg: cfg
        for (m, seq, b), (kc, vc, bt, sl, q) in data.items():
            h, hkv, d = SHAPES[m]
            s = choose_num_kv_splits(b, hkv, seq, SMS)
            ws = DecodeWorkspace.allocate(b, h, s, d, "cuda"); out = torch.empty_like(q)
            try:
                ms = bench(lambda: decode_attention(q, kc, vc, bt, sl, 0.1, out, s, ws))
            except Exception as e:
                ms = None
            gbs = 2 * b * seq * hkv * d * 2 / ms / 1e6 if ms else None
            res["decode"].append(dict(bn=bn, w=w, st=st, m=m, seq=seq, b=b, s=s, us=ms and ms * 1e3, gbs=gbs))
        print("cfg", bn, w, st, [round(r["gbs"] or 0) for r in res["decode"][-len(data):]], flush=True)
    # splits sweep at default cfg
    dec.decode_launch_config = sys.modules["kernels.decode_attention"].__dict__["decode_launch_config"]
    for bn, w, st in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (32, 4, 3)]:
        cfg = dec.DecodeLaunchConfig(bn, w, st)
        dec.decode_launch_config = lambda hd, cfg=cfg: cfg
        for (m, seq, b), (kc, vc, bt, sl, q) in data.items():
            if b > 64: continue
            h, hkv, d = SHAPES[m]
            for s in (1, 2, 4, 8, 16, 32, 64):
                ws = DecodeWorkspace.allocate(b, h, s, d, "cuda"); out = torch.empty_like(q)
                ms = bench(lambda: decode_attention(q, kc, vc, bt, sl, 0.1, out, s, ws))
                res["splits"].append(dict(bn=bn, w=w, st=st, m=m, seq=seq, b=b, s=s, us=ms * 1e3, gbs=2 * b * seq * hkv * d * 2 / ms / 1e6))
    del data
if mode in ("extend", "all"):
    for m, (h, hkv, d) in SHAPES.items():
        for seq in (1024, 4096):
            kc, vc, bt, sl = cache(1, seq, hkv, d)
            q = torch.randn(seq, h, d, device="cuda", dtype=DT); out = torch.empty_like(q)
            qsl = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
            for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)):
                cfg = ext.ExtendLaunchConfig(bm, bn, w, st)
                ext.extend_launch_config = lambda hd, cfg=cfg: cfg
                try:
                    ms = bench(lambda: extend_attention(q, kc, vc, bt, qsl, sl, 0.1, seq, out))
                except Exception as e:
                    print("fail", bm, bn, w, st, type(e).__name__, flush=True); ms = None
                tf = 2 * h * d * seq * seq / ms / 1e9 if ms else None
                res["extend"].append(dict(bm=bm, bn=bn, w=w, st=st, m=m, seq=seq, ms=ms, tflops=tf))
                print("ext", m, seq, bm, bn, w, st, tf and round(tf), flush=True)
out_dir = os.environ.get("OUT", "/tmp")
json.dump(res, open(f"{out_dir}/tune_{mode}.json", "w"))
