"""What torch's fused RMSNorm does on this GPU for Gemma 3's norms (train.fused_rms_norm), against transformers'
Gemma3RMSNorm and Liger's kernel: which ATen operators run, how close bf16 outputs and input gradients are to the
fp32 formula, and the host and GPU time per call (fwd + bwd). Run on the H200 (docs/benchmarks.md, 2026-12-05):

    python docs/bench/norm_probe.py --out norm_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from medgemma_lib.models import norm_kernels


def _variants():
    out = {"transformers": lambda m: m}

    def fused(m):
        norm_kernels.fuse_rms_norms(m)
        return m

    out["torch fused (norm_kernels)"] = fused
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        def liger(m):
            lm = LigerRMSNorm(
                m.weight.shape[0], eps=m.eps, offset=1.0, casting_mode="gemma", init_fn="zeros", in_place=False
            )
            lm = lm.to(m.weight.device, m.weight.dtype)
            with torch.no_grad():
                lm.weight.copy_(m.weight)
            lm.weight.requires_grad_(False)
            return lm

        out["liger"] = liger
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="norm_probe.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {"torch": torch.__version__, "mixed_dtype_ok": norm_kernels.mixed_dtype_ok(dev), "shapes": {}}
    gen = torch.Generator().manual_seed(0)
    for label, shape in {"4b hidden 8192x2560": (1, 8192, 2560), "4b q_norm 8192x8x256": (1, 8192, 8, 256)}.items():
        dim = shape[-1]
        w = torch.randn(dim, generator=gen) * 0.3
        x = (torch.randn(*shape, generator=gen) * 3).to(dev, torch.bfloat16)
        dy = torch.randn(*shape, generator=gen).to(dev, torch.bfloat16)
        xf = x.float().requires_grad_(True)
        ref_y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.to(dev))
        ref_y.backward(dy.float())
        rows = {}
        for name, make in _variants().items():
            m = Gemma3RMSNorm(dim, eps=1e-6).to(dev, torch.bfloat16)
            with torch.no_grad():
                m.weight.copy_(w)
            m.weight.requires_grad_(False)  # frozen, as under LoRA
            m = make(m)
            xr = x.detach().requires_grad_(True)
            y = m(xr)
            y.backward(dy)
            err_y = float(((y.float() - ref_y.detach()).abs() / ref_y.detach().abs().clamp_min(1e-3)).max())
            err_dx = float((xr.grad.float() - xf.grad).norm() / xf.grad.norm())
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                xr2 = x.detach().requires_grad_(True)
                m(xr2).backward(dy)
                torch.cuda.synchronize()
            ops = sorted({e.key for e in prof.key_averages() if e.key.startswith(("aten::", "Liger"))})
            n = 50
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                xr3 = x.detach().requires_grad_(True)
                m(xr3).backward(dy)
            host = (time.perf_counter() - t0) / n  # launches only (queue not drained)
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) / n
            rows[name] = {
                "max_rel_err_y": err_y,
                "rel_err_dx": err_dx,
                "host_ms_per_call": round(host * 1000, 3),
                "wall_ms_per_call": round(total * 1000, 3),
                "dtype": str(y.dtype),
                "aten_ops": ops[:30],
            }
            print(label, name, {k: v for k, v in rows[name].items() if k != "aten_ops"}, flush=True)
        res["shapes"][label] = rows
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("mixed_dtype_ok", res["mixed_dtype_ok"])


if __name__ == "__main__":
    main()
