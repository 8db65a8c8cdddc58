"""Optimizer state kept narrow (adaprec.optim.NarrowOptimizerState): quality and memory.

* ``quality``: trains the same model from the same seed with the moments kept
  in fp32 (torch's own step), bf16, fp16, int8, fp8 E4M3/E5M2 and int4, plus
  the linear-second-moment variants that show why the second moment takes
  the sqrt map; prints the final losses and their ratio to fp32. Two tasks:
  an MLP on scikit-learn's digits and the ``char-transformer`` task
  (nanoGPT's CPU configuration on the Shakespeare plays, AdamW).
* ``memory``: peak resident memory of an Adam step on a ~67 M-parameter
  model, each variant in its own fresh process: fp32 state, adaprec's bf16 /
  int8 / fp8 / int4 state, and torchao's ``AdamW8bit``. The peak is the
  process high-water mark (VmHWM) after a reset through ``/proc/self/clear_refs``
  once a first step has created the state (:class:`adaprec.memory.PeakMemory`),
  so it is the steady state: parameters + gradients + state + the step's
  temporaries. Memory only: no timing here.
* ``speed``: the optimizer step's time on the same kind of model, the
  variants side by side in one process, taking turns (a shared machine's
  drift hits them alike): torch's AdamW (its default single-tensor step, the
  ``foreach`` and the ``fused`` one), adaprec's int8 moments through the
  fused kernel (:mod:`adaprec.optim.fused_adam`) and through the eager
  update, adaprec's bf16 moments, and torchao's ``AdamW8bit`` (compiled).
  Median over the timed steps; ``--write`` puts the table in
  docs/BENCHMARKS.md.

Run: ``python bench/bench_optimizer_state.py quality|memory|speed [--steps N] [--write]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

QUALITY_FORMATS: dict[str, object] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
    "int8": "int8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    "int4": "int4",
    "int8, first moment linear": ("int8", "fp8_e4m3/sqrt"),
    "int8, second moment linear (uint8 of sqrt v)": ("int8/sqrt", "uint8/sqrt"),
    "torchao Adam8bit / AdamW8bit": "torchao",
}
MEMORY_VARIANTS = ("no optimizer", "fp32", "bf16", "int8", "fp8_e4m3", "int4", "torchao AdamW8bit")
SPEED_VARIANTS = ("torch AdamW (default)", "torch AdamW foreach", "torch AdamW fused", "adaprec int8, fused kernel",
                  "adaprec int8, eager", "adaprec bf16, eager", "torchao AdamW8bit")
SPEED_SECTION = "Optimizer step time with narrow moments (issue 19, item 4)"


class _Peer:
    """torchao's 8-bit optimizer behind the same two calls the bench makes."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self) -> None:
        self.opt.step()

    def nbytes(self) -> dict[str, int]:
        return {"torchao": _state_bytes(self.opt)}


def _narrow(opt: torch.optim.Optimizer, model: nn.Module, spec: object):
    if spec == "torchao":  # the same hyper-parameters, torchao's 8-bit class
        from torchao.optim import Adam8bit, AdamW8bit

        g = opt.param_groups[0]
        cls = AdamW8bit if isinstance(opt, torch.optim.AdamW) else Adam8bit
        peer = cls(model.parameters(), lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
        return _Peer(peer)
    from adaprec.optim import NarrowOptimizerState

    ns = NarrowOptimizerState(opt, model=model)
    ns.set_formats({p: spec for p in model.parameters()})
    return ns


def digits_run(spec: object, steps: int, seed: int = 0) -> dict[str, float]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(123)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1500], perm[1500:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ns = _narrow(opt, model, spec)
    bg = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (64,), generator=bg)]
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        ns.step()
    with torch.no_grad():
        train = float(nn.functional.cross_entropy(model(x[tr]), y[tr]))
        val = float(nn.functional.cross_entropy(model(x[te]), y[te]))
    return {"train_loss": train, "val_loss": val, "state_bytes": sum(ns.nbytes().values())}


def char_run(spec: object, steps: int, seed: int = 0) -> dict[str, float]:
    from adaprec.experiments.tasks.char_transformer import make_task

    task = make_task("char-transformer")
    model = task.make_model(seed)
    opt = task.make_optimizer(model)
    ns = _narrow(opt, model, spec)
    done = 0
    epoch = 0
    while done < steps:
        for xb, yb in task.train_loader(seed * 1000 + epoch):
            model.zero_grad(set_to_none=True)
            task.loss_fn(model(xb), yb).backward()
            ns.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    ev = task.evaluate(model)
    return {"val_loss": float(ev["val_loss"]), "state_bytes": sum(ns.nbytes().values())}


def quality(steps_digits: int, steps_char: int, seeds: int, labels: list[str], tasks: list[str]) -> list[dict]:
    rows = []
    for label, spec in QUALITY_FORMATS.items():
        if labels and label not in labels:
            continue
        for task, fn, steps, key in (("digits MLP", digits_run, steps_digits, "val_loss"),
                                     ("char-transformer", char_run, steps_char, "val_loss")):
            if task.split()[0].split("-")[0] not in tasks:
                continue
            vals = [fn(spec, steps, seed)[key] for seed in range(seeds)]
            rows.append({"task": task, "state": label, "steps": steps, "val_loss": vals})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------- memory, one fresh process per variant

def memory_child(variant: str, width: int, layers: int) -> dict:
    from adaprec.memory import PeakMemory

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=True) for _ in range(layers)])
    params = sum(p.numel() for p in model.parameters())
    if variant == "no optimizer":  # the floor: the process, the parameters and their gradients
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        step = lambda: None  # noqa: E731
    elif variant == "torchao AdamW8bit":
        from torchao.optim import AdamW8bit

        opt: torch.optim.Optimizer = AdamW8bit(model.parameters(), lr=1e-3)
        step = opt.step
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = opt.step
        if variant != "fp32":
            step = _narrow(opt, model, variant).step
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():  # gradients as backward leaves them: one fp32 tensor per parameter
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    step()  # creates the state
    state_bytes = _state_bytes(opt)
    peak = PeakMemory()
    peak.reset()
    base = _rss()
    step()
    reading = peak.read()
    return {"variant": variant, "params": params, "state_bytes": state_bytes, "rss_before_step": base,
            "peak": reading.peak_bytes, "method": reading.method}


def _tensors(state: dict) -> list[torch.Tensor]:
    out = []
    for v in state.values():
        if torch.is_tensor(v):
            inner = [getattr(v, a) for a in ("codes", "scale", "qmap") if hasattr(v, a) and torch.is_tensor(getattr(v, a))]
            out.extend(inner or [v])
    return out


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold (torchao's subclasses: their codes, scales and maps)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in _tensors(s))


def _rss() -> int:
    import re

    text = Path("/proc/self/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else -1


def memory(width: int, layers: int) -> list[dict]:
    rows = []
    for variant in MEMORY_VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--width", str(width), "--layers", str(layers)],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            rows.append({"variant": variant, "error": out.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _speed_variant(variant: str, model: nn.Module):
    """(a step function, the bytes its state holds after a step) for one variant, on its own model copy."""
    if variant == "torchao AdamW8bit":
        from torchao.optim import AdamW8bit

        opt: torch.optim.Optimizer = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        kw = {"foreach": True} if variant.endswith("foreach") else {"fused": True} if variant.endswith("fused") else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **kw)
    if not variant.startswith("adaprec"):
        return opt.step, lambda: _state_bytes(opt)
    from adaprec.optim import NarrowOptimizerState

    ns = NarrowOptimizerState(opt, model=model, fused="fused kernel" in variant)
    ns.set_formats({p: variant.split()[1].rstrip(",") for p in model.parameters()})
    return ns.step, lambda: sum(ns.nbytes().values())


def speed(width: int, layers: int, steps: int, warmup: int) -> list[dict]:
    import copy
    import statistics
    import time

    from adaprec.optim import fused_adam

    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(width, width, bias=True) for _ in range(layers)])
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in base.parameters()]
    runs = []
    for v in SPEED_VARIANTS:
        model = copy.deepcopy(base)
        for p, gr in zip(model.parameters(), grads, strict=True):
            p.grad = gr.clone()
        step, held = _speed_variant(v, model)
        runs.append({"variant": v, "step": step, "held": held, "times": []})
    for i in range(steps):
        for r in runs:
            t0 = time.perf_counter()
            r["step"]()
            if i >= warmup:
                r["times"].append(time.perf_counter() - t0)
        print(f"  step {i + 1}/{steps}", flush=True)
    ref = statistics.median(runs[0]["times"])
    rows = []
    for r in runs:
        ms = statistics.median(r["times"])
        rows.append({"variant": r["variant"], "ms": 1e3 * ms, "vs": ref / ms, "state": r["held"]()})
    params = sum(p.numel() for p in base.parameters())
    kernel = fused_adam.available()
    rows.append({"params": params, "kernel": kernel[1] or "built and loaded"})
    return rows


def _speed_table(rows: list[dict], width: int, layers: int, steps: int, warmup: int) -> str:
    import platform

    meta = rows[-1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = [
        f"`python bench/bench_optimizer_state.py speed --width {width} --layers {layers} --steps {steps} "
        f"--warmup {warmup} --threads {torch.get_num_threads()}`: one AdamW step (lr 1e-3, weight decay 0.01) over "
        f"{layers} `nn.Linear({width}, {width})` ({meta['params'] / 1e6:.1f} M parameters, fixed gradients), the "
        f"variants side by side in one process, taking turns; median of {steps - warmup} timed steps after "
        f"{warmup} untimed (measured). Machine: {cpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Fused kernel: {meta['kernel']}.",
        "",
        "| variant | step ms | vs torch AdamW (default) | state held (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows[:-1]:
        lines.append(f"| {r['variant']} | {r['ms']:.1f} | {r['vs']:.2f}x | {r['state'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", choices=["quality", "memory", "speed"])
    ap.add_argument("--steps", type=int, default=8, help="speed: steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="speed: untimed steps first (torchao compiles)")
    ap.add_argument("--write", action="store_true", help="speed: write the table to docs/BENCHMARKS.md")
    ap.add_argument("--child")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps-digits", type=int, default=400)
    ap.add_argument("--steps-char", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", default="", help="comma-separated labels of QUALITY_FORMATS (default: all)")
    ap.add_argument("--tasks", default="digits,char", help="digits and/or char")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(memory_child(a.child, a.width, a.layers)))
        return
    if a.mode == "quality":
        labels = [x.strip() for x in a.formats.split(";" if ";" in a.formats else ",") if x.strip()]
        quality(a.steps_digits, a.steps_char, a.seeds, labels, a.tasks.split(","))
    elif a.mode == "memory":
        memory(a.width, a.layers)
    elif a.mode == "speed":
        body = _speed_table(speed(a.width, a.layers, a.steps, a.warmup), a.width, a.layers, a.steps, a.warmup)
        print(body)
        if a.write:
            from _markdown import write_section

            write_section(SPEED_SECTION, body)
    else:
        ap.error("say quality, memory or speed")


if __name__ == "__main__":
    main()
