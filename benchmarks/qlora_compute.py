"""NF4 layer forward+backward time by bitsandbytes compute dtype, side by side in one process.

    python benchmarks/qlora_compute.py

The rule behind `model.compute_dtype: auto`: on a CPU without native bf16 (no AMX / AVX512_BF16),
bf16 compute is emulated. Prints each dtype's time relative to float32 compute, and a plain fp32
nn.Linear for scale. Check `lscpu` before reading the ratios.
"""

from __future__ import annotations

import time

import torch

from lorafam.quant import quiet_bitsandbytes


def nf4_layer(weight: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.weight = layer.weight._quantize("cpu")  # what moving the layer to a device does
    return layer.train()


def seconds_per_pass(layer: torch.nn.Module, x: torch.Tensor, repeats: int = 10) -> float:
    for _ in range(2):  # warm-up
        layer(x).float().sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        layer(x).float().sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    quiet_bitsandbytes()
    torch.manual_seed(0)
    weight = torch.nn.Linear(576, 1536, bias=False).weight.data  # SmolLM2-135M's MLP shape
    x = torch.randn(256, 576, requires_grad=True)
    times = {str(dtype).removeprefix("torch."): seconds_per_pass(nf4_layer(weight, dtype), x)
             for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    plain = torch.nn.Linear(576, 1536, bias=False)
    times["fp32 nn.Linear"] = seconds_per_pass(plain, x)
    base = times["float32"]
    for name, t in times.items():
        print(f"{name:>15}: {t * 1e3:7.1f} ms per forward+backward  ({t / base:.2f}x float32 compute)")


if __name__ == "__main__":
    main()
