"""The ``adaprec`` command: formats, run, report, devices, explain, calibrate.

Heavy imports happen inside each command, so ``adaprec formats`` starts fast
and a missing optional extra only matters to the command that needs it.

Errors: a mistake the user can fix prints one line ``adaprec: error: ...``
(the problem and the fix) and exits 2; anything else is a bug of ours and
prints one line ``adaprec: internal error: ...`` and exits 1. ``--debug``
re-raises instead, to show the traceback. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from adaprec.errors import AdaprecError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def _cmd_formats(args: argparse.Namespace) -> int:
    from adaprec.formats.table import format_table

    print(format_table())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from adaprec.experiments.config import load_config
    from adaprec.experiments.ranks import launch, launched_world_size
    from adaprec.experiments.runner import run_experiment

    config = load_config(args.config)  # a bad config fails here, before any rank starts
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        from adaprec.distributed import DistributedError

        raise DistributedError(f"--nproc must be a number of processes >= 1, got {nproc}")
    if nproc > 1 and launched_world_size() <= 1:  # start the ranks; rank 0 prints the summary
        argv = ["run", args.config] + (["--out", args.out] if args.out else []) + (
            ["--resume"] if args.resume else []) + (["--quiet"] if args.quiet else []) + (
            ["--debug"] if getattr(args, "debug", False) else [])
        code = launch(argv, nproc)
        if code == 1:
            print(f"adaprec: error: a rank of the {nproc}-process run failed (its message is above); "
                  "rerun with --debug for the traceback", file=sys.stderr)
        return code
    if launched_world_size() > 1 and int(os.environ.get("RANK", "0") or 0) != 0:
        try:  # a rank other than 0: trains its slice, writes and prints nothing (rank 0 reports errors too)
            run_experiment(config, out_dir=args.out, resume=args.resume, progress=False, report=False)
        except AdaprecError:
            if getattr(args, "debug", False):
                raise
            return EXIT_USER_ERROR
        return 0
    run_dir = run_experiment(config, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    summary = run_dir / "report.md"
    if summary.exists():
        table = [line for line in summary.read_text().splitlines() if line.startswith("|")]
        print("\n".join(table))
    print(f"report: {(run_dir / 'report.html').resolve()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from adaprec.experiments.report import write_report

    paths = write_report(args.run_dir)
    for p in paths if isinstance(paths, (list, tuple)) else paths.values():
        print(p)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaprec.energy.calibrate import CalibrationError, calibrate
    from adaprec.energy.meters import detect_meter

    meter, why = detect_meter()
    if meter is None:
        raise CalibrationError(f"cannot calibrate: {why}. Run it on a machine with an NVIDIA GPU (nvidia-ml-py) "
                               "or Intel/AMD RAPL (/sys/class/powercap)")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CalibrationError(f"{out} exists; pass --force to overwrite it or choose another --out")
    print(f"calibrating {args.device} with meter {meter.name} ({why}); formats {', '.join(args.formats)}")
    cal = calibrate(meter, args.device, args.formats, min_seconds=args.min_seconds)
    cal.to_toml(out, name=args.name or out.stem, device=str(args.device), meter=meter.name)
    print(f"fit residual {100 * cal.residual_rel:.1f} %, idle {cal.idle_w:.3g} W; "
          + ", ".join(f"{f} {pj:.4g} pJ/MAC" for f, pj in cal.pj_per_mac.items())
          + f", {cal.pj_per_byte:.4g} pJ/byte")
    print(f"profile: {out.resolve()} (use it with energy_profile: {out})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``adaprec: error: ...; see 'adaprec run --help'``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"adaprec: error: {_one_line(message)}; see '{self.prog} --help'\n")


_DEBUG_HELP = "on an error, show the Python traceback instead of one line (for bug reports)"


def _cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from adaprec.explainer import simulate_config

    sim = simulate_config(args.model, args.target or "h100-sxm", batch=args.batch, seq_len=args.seq_len,
                          policy=args.policy or "error-budget", formats=args.formats)
    if args.format == "json":
        print(json.dumps(sim.to_dict(), indent=2))
    else:
        print(sim.table(args.format, max_rows=args.rows))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import json

    from adaprec.explainer import explain_task

    if args.meta or args.target:  # a model far bigger than this machine: shapes only, priced on the target
        args.model = args.config_or_task
        return _cmd_simulate(args)
    explanation = explain_task(args.config_or_task, policy=args.policy, hardware=None if args.hardware == "none" else "auto",
                               seed=args.seed, energy_profile=args.energy_profile)
    if args.format == "json":
        print(json.dumps(explanation.to_dict(), indent=2))
    else:
        print(explanation.table(args.format))
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from adaprec.hardware import probe

    report = probe(args.device, refresh=args.refresh, sweep="quick" if args.quick else "full")
    print(report.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adaprec",
        description="Adaptive precision training: compare precision policies against fp32, with an energy ledger.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug is also accepted after the command (adaprec run x.yaml --debug); SUPPRESS keeps a leading one
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("formats", parents=[common], help="print the table of number formats and their ranges")
    p.set_defaults(func=_cmd_formats)
    p = sub.add_parser("run", parents=[common],
                       help="train a task under several policies and the fp32 baseline; write a report")
    p.add_argument("config", help="experiment config (YAML), e.g. examples/quickstart.yaml")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars (CI)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N local processes through torch.distributed.run (gloo on CPU, NCCL on GPUs): "
                        "data-parallel, one precision decision for all ranks, one store and one report")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("report", parents=[common], help="(re)write the report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("devices", parents=[common],
                       help="what this device runs natively and how fast (a short measured GEMM sweep, cached)")
    p.add_argument("--device", default=None, help="torch device to probe (default cpu; e.g. cuda)")
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--quick", action="store_true", help="one small shape per format (well under a second)")
    p.set_defaults(func=_cmd_devices)
    p = sub.add_parser("explain", parents=[common],
                       help="before training: every GEMM of a task's model, the formats this device runs natively "
                            "for it, and the modeled cost of a step")
    p.add_argument("config_or_task", metavar="TARGET",
                   help="an experiment config (its task and first policy), a built-in task name "
                        "(e.g. digits-cnn) or package.module:function returning a Task; with --meta or --target: "
                        "a model preset (gpt2-124m, llama-1b, llama2-7b, llama3.1-8b, llama2-70b) or a Hugging "
                        "Face config.json")
    _simulate_args(p, default_target=None)
    p.add_argument("--policy", default=None,
                   help="policy to explain (default: a config's error-budget, else its first policy; error-budget)")
    p.add_argument("--hardware", choices=("auto", "none"), default="auto",
                   help="auto: probe this device (cached); none: assume nothing narrow runs natively")
    p.add_argument("--energy-profile", default=None, help="device profile of the modeled energy (default 7nm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the example batch")
    p.add_argument("--format", choices=("markdown", "plain", "json"), default="markdown", help="output format")
    p.set_defaults(func=_cmd_explain)
    p = sub.add_parser("simulate", parents=[common],
                       help="price one training step of a model (any size, built on the meta device) on a target "
                            "accelerator: roofline time, energy and memory vs bf16 and fp32 (simulated)")
    p.add_argument("model", help="a preset (gpt2-124m, llama-1b, llama2-7b, llama3.1-8b, llama2-70b) or a Hugging "
                                 "Face config.json")
    p.add_argument("--policy", default=None, help="policy whose rules choose the plan (default error-budget)")
    p.add_argument("--format", choices=("markdown", "plain", "json"), default="markdown", help="output format")
    _simulate_args(p, default_target="h100-sxm")
    p.set_defaults(func=_cmd_simulate)
    p = sub.add_parser("calibrate", parents=[common], help="fit an energy profile from measured GEMM and bandwidth sweeps (needs a meter)")
    p.add_argument("--device", default="cuda", help="torch device to run the sweeps on (default cuda)")
    p.add_argument("--formats", nargs="+", default=["fp32", "bf16"], help="formats of the GEMM sweeps")
    p.add_argument("--min-seconds", type=float, default=1.0, help="measure each workload at least this long")
    p.add_argument("--out", default="calibrated.toml", help="profile file to write")
    p.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def _simulate_args(p: argparse.ArgumentParser, default_target: str | None) -> None:
    p.add_argument("--target", default=default_target,
                   help="roofline device profile to simulate on (h100-sxm, a100, rtx-4090, cpu-epyc-2t or a TOML file)"
                        + ("" if default_target else "; implies --meta"))
    if default_target is None:
        p.add_argument("--meta", action="store_true",
                       help="build the model from its config on the meta device and simulate it on --target "
                            "(default h100-sxm)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--formats", nargs="+", default=None, help="restrict the simulated plan to these formats")
    p.add_argument("--rows", type=int, default=20, help="GEMM calls shown in the table, costliest first")


def _one_line(e: object) -> str:
    """``e`` as one printable line: newlines folded, other control or line-separator characters escaped."""
    text = re.sub(r"\s*[\r\n]\s*", " ", str(e)).strip()
    text = "".join(
        c if unicodedata.category(c) not in ("Cc", "Zl", "Zp") else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
    return text or type(e).__name__


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Our own warnings (``adaprec: ...``) as one line ``adaprec: warning: ...``; others as Python prints them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
            text = str(message)
            if not text.startswith("adaprec: "):
                return shown(message, category, filename, lineno, file, line)
            print(f"adaprec: warning: {_one_line(text.removeprefix('adaprec: '))}", file=file or sys.stderr)
            return None

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adaprec`` command line; returns the exit status (0 ok, 2 user error, 1 internal error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER_ERROR)
    debug = bool(getattr(args, "debug", False))
    with _one_line_warnings():
        try:
            return int(args.func(args) or 0)
        except AdaprecError as e:
            if debug:
                raise
            print(f"adaprec: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            if debug:
                raise
            hint = "; rerun the same command with --resume to continue" if args.command == "run" else ""
            print(f"adaprec: interrupted{hint}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if debug:
                raise
            print(f"adaprec: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
                  "traceback; please report it)", file=sys.stderr)
            return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
