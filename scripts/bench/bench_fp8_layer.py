#!/usr/bin/env python
"""bench_fp8_layer: one frozen bf16 Linear under torchao float8 training, forward + backward on the GPU.

    python scripts/bench/bench_fp8_layer.py [--features 3072] [--batch 4] [--tokens 4562] [--repeats 10]

Compares, on the same inputs, plain bf16, torchao's own recipes (rowwise, tensorwise) and the trees'
fp8.float8_config (the recipes with the weight-gradient casts off). At RL's micro-batch (4 x 4562 tokens, not a
multiple of 16) the recipes fail in the weight-gradient matmul a frozen weight discards; float8_config runs.
Prints one JSON line per variant: ms per forward + backward (CUDA-synchronised mean over --repeats after 3
warm-up passes), or the error, and the output / input-gradient error relative to bf16. Needs torchao and a
GPU with fp8 matmuls; exits 2 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SFT"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4562, help="per sample (RL at 720^2: 512 + 2 x 2025)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    from etchr_sft.fp8 import Fp8Unavailable, check_fp8

    try:
        check_fp8("float8_rowwise")
    except Fp8Unavailable as exc:
        print(f"bench_fp8_layer: {exc}", file=sys.stderr)
        return 2
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from etchr_sft.fp8 import float8_config

    torch.manual_seed(0)
    shape = (a.batch, a.tokens, a.features)
    x0 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    g0 = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def run(config):
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(a.features, a.features)).cuda().to(torch.bfloat16)
        m.requires_grad_(False)
        if config is not None:
            convert_to_float8_training(m, config=config)
        x = x0.clone().requires_grad_(True)
        for i in range(3 + a.repeats):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.time()
            x.grad = None
            y = m(x)
            y.backward(g0)
        torch.cuda.synchronize()
        return y.detach().float(), x.grad.float(), (time.time() - t0) / a.repeats * 1e3

    def rel(u, v):
        return float((u - v).norm() / v.norm())

    print(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(shape)}))
    yb, gb, ms = run(None)
    print(json.dumps({"variant": "bf16", "ms": round(ms, 3)}))
    for mode, recipe in (("float8_rowwise", "rowwise"), ("float8_tensorwise", "tensorwise")):
        for name, cfg in ((f"torchao_{recipe}", Float8LinearConfig.from_recipe_name(recipe)),
                          (f"{mode}_float8_config", float8_config(mode))):
            try:
                y, g, ms = run(cfg)
                print(json.dumps({"variant": name, "ms": round(ms, 3), "out_rel_err": round(rel(y, yb), 5),
                                  "grad_input_rel_err": round(rel(g, gb), 5)}))
            except RuntimeError as exc:
                print(json.dumps({"variant": name, "error": str(exc)[:200]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
