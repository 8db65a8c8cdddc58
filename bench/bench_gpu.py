"""The native-execution benchmark on a GPU, with NVML energy beside the modeled figure.

Run it when a GPU is available (one short script, a few minutes):

    python bench/bench_gpu.py [--iters 200] [--write]

It prints and (with ``--write``) records in docs/BENCHMARKS.md:

(a) ``adaprec.hardware.probe("cuda")``: which formats run natively (bf16,
    fp16, int8 ``_int_mm``, fp8 ``_scaled_mm`` on sm_89+) and how fast;
(b) the wide GPT-style character model (6 layers, 384 wide, block 256,
    batch 64) trained from one seed under plain fp32, ``torch.autocast``
    bf16 and adaprec's default, with the median step time, the final
    validation loss, and the energy measured by NVML
    (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since driver load,
    read before and after each variant) next to the ledger's modeled joules.

``--device cpu --iters 4`` runs the same code on the CPU without a meter (a
smoke test of the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import adaprec  # noqa: E402
from _markdown import write_section  # noqa: E402
from adaprec.experiments.tasks.char_transformer import CharGPT  # noqa: E402
from adaprec.hardware import probe  # noqa: E402
from bench_native import Size, _batches, _data, _lr, _val_loss  # noqa: E402

VARIANTS = ("plain fp32", "autocast bf16", "adaprec default")


class Nvml:
    """Total energy of GPU 0 since the driver loaded (mJ), or None without NVML."""

    def __init__(self) -> None:
        self.handle = None
        self.why = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._read()
        except Exception as e:  # no NVML, no GPU, or a GPU without the energy counter
            self.handle, self.why = None, f"no NVML energy counter ({type(e).__name__}: {e})"

    def joules(self) -> float | None:
        return None if self.handle is None else self._read() / 1e3


def _train(variant: str, size: Size, device: torch.device, data, meter: Nvml) -> dict:
    train, val, vocab = data
    torch.manual_seed(0)
    model = CharGPT(vocab, d=size.width, heads=size.heads, layers=size.layers, block=size.block).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, betas=(0.9, 0.99), weight_decay=0.1)
    ap = adaprec.AdaptivePrecision(model, opt, total_steps=size.iters) if variant == "adaprec default" else None
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    e0 = meter.joules()
    for it, (x, y) in enumerate(_batches(train, size)):
        x, y = x.to(device), y.to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(it, size)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if variant == "autocast bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(x)
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
            opt.step()
        elif ap is not None:
            with ap.autocast():
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            ap.backward(loss)
            ap.step()
        else:
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    e1 = meter.joules()
    out = {
        "variant": variant,
        "step_ms": 1e3 * statistics.median(times[5:] or times),
        "val_loss": _val_loss(model, val.to(device), size.block),
        "measured_j": None if e0 is None or e1 is None else e1 - e0,
    }
    if ap is not None:
        s = ap.energy.summary()
        out["modeled_j"] = s["modeled_j"]
        out["formats"] = ", ".join(f"{f} {100 * n / s['macs']:.0f}%" for f, n in s["macs_by_format"].items())
        ap.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; run it where the device tool lends a GPU "
                         "(or --device cpu --iters 4 to smoke-test the script)")
    report = probe(device, refresh=True)
    meter = Nvml()
    batch = 64 if device.type == "cuda" else 2
    size = Size("wide (6x384, block 256)", 6, 6, 384, 256, batch, args.iters, 1e-3)
    data = _data()
    rows = [_train(v, size, device, data, meter) for v in VARIANTS]
    base = rows[0]
    lines = [report.table(), "", f"**{size.name}, batch {batch}, {args.iters} iterations on {report.name}**", "",
             "| variant | step (ms) | vs fp32 | val loss | energy measured (NVML) | energy modeled | MACs by format |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mj = "n/a: " + meter.why if r["measured_j"] is None else f"{r['measured_j']:.1f} J"
        mod = f"{r['modeled_j']:.3g} J (profile 7nm)" if "modeled_j" in r else "-"
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {base['step_ms'] / r['step_ms']:.2f}x | "
                     f"{r['val_loss']:.4f} | {mj} | {mod} | {r.get('formats', '')} |")
    body = "\n".join(lines)
    print(body)
    if args.write and device.type == "cuda":
        write_section("Native execution on a GPU, with measured energy (issue: native)", body)


if __name__ == "__main__":
    main()
