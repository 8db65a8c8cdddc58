"""Per-shape GEMM speedups over fp32, casts included, of the project's GPTs on this machine.

What a shape-aware plan decides from (:mod:`adaprec.hardware.shapes`): the
linear GEMMs of one training step are found the way the engine finds them
at discovery (``describe`` of every ``F.linear`` call, the forward GEMM's
(M, K, N) in ``OpGemm.mkn``, the backward GEMMs from ``linear_gemms``),
timed once in fp32, int8 and bf16 as adaprec runs them, and the formats
that pay are printed per module. The load average is printed beside the
figures: the machine is shared.

Run: ``python bench/bench_shapes.py [--sizes small wide] [--formats int8 bf16] [--every] [--budget 5] [--threads N] [--probe]``
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.overrides import TorchFunctionMode

from adaprec.engine.ops import describe
from adaprec.experiments.tasks.char_transformer import CharGPT
from adaprec.hardware import formats_by_module, linear_gemms, measure_gemms, probe
from adaprec.hardware.shapes import GemmShape

SIZES = {  # name: (layers, heads, width, block, batch)
    "small": ("nanoGPT CPU config (4x128, block 64, batch 12)", 4, 4, 128, 64, 12),
    "wide": ("wide GPT (6x384, block 256, batch 16)", 6, 6, 384, 256, 16),
}
VOCAB = 65  # the character set of the Shakespeare text the benchmarks train on


class _LinearShapes(TorchFunctionMode):
    """module name -> the GEMM shapes of its linear calls, as ``describe`` sees them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.names = {id(p): n.rsplit(".", 1)[0] for n, p in model.named_parameters()}
        self.shapes: dict[str, list[GemmShape]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        call = describe(func, args, kwargs or {})
        if call is not None and call.kind == "linear" and call.weight is not None:
            name = self.names.get(id(call.weight), "?")
            for g in call.gemms:
                if g.mkn is not None:
                    self.shapes.setdefault(name, []).extend(
                        linear_gemms(*g.mkn, input_grad=g.grad_a, weight_grad=g.grad_b))
        return func(*args, **(kwargs or {}))


def model_shapes(layers: int, heads: int, width: int, block: int, batch: int) -> dict[str, list[GemmShape]]:
    torch.manual_seed(0)
    model = CharGPT(VOCAB, d=width, heads=heads, layers=layers, block=block)
    idx = torch.randint(0, VOCAB, (batch, block))
    mode = _LinearShapes(model)
    with mode:
        model(idx).square().mean().backward()
    return mode.shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--formats", nargs="+", default=["int8", "bf16"], choices=["int8", "bf16", "fp16"])
    ap.add_argument("--every", action="store_true", help="time every shape, even after a format was far slower")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed runs (default: the library's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--probe", action="store_true", help="skip the formats the device probe rules out, as adaprec does")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = probe() if args.probe else None
    for key in args.sizes:
        title, *dims = SIZES[key]
        per_module = model_shapes(*dims)
        shapes = [s for ss in per_module.values() for s in ss]
        kw = {"far_slower": float("inf")} if args.every else {}
        if args.budget is not None:
            kw["budget_s"] = args.budget
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        table = measure_gemms(shapes, args.formats, report=report, refresh=True, **kw)
        took = time.perf_counter() - t0
        print(f"\n## {title}: {len(shapes)} linear GEMMs per step, {len(set(shapes))} distinct; "
              f"measured in {took:.1f} s (load average {load:.2f} before, {os.getloadavg()[0]:.2f} after, "
              f"{os.cpu_count()} CPUs)\n")
        print(table.table())
        decided = formats_by_module(table, per_module, args.formats)
        narrowed = {n: sorted(f - {"fp32"}) for n, f in decided.items() if f - {"fp32"}}
        print(f"\nmodules that pay in a narrow format: {narrowed or 'none (every GEMM stays fp32)'}")


if __name__ == "__main__":
    main()
