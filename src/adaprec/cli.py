"""The ``adaprec`` command: formats, run, report, calibrate.

Heavy imports happen inside each command, so ``adaprec formats`` starts fast
and a missing optional extra only matters to the command that needs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adaprec.errors import AdaprecError


def _cmd_formats(args: argparse.Namespace) -> int:
    from adaprec.formats.table import format_table

    print(format_table())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from adaprec.experiments.config import load_config
    from adaprec.experiments.runner import run_experiment

    config = load_config(args.config)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaprec",
        description="Adaptive precision training: compare precision policies against fp32, with an energy ledger.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("formats", help="print the table of number formats and their ranges")
    p.set_defaults(func=_cmd_formats)
    p = sub.add_parser("run", help="train a task under several policies and the fp32 baseline; write a report")
    p.add_argument("config", help="experiment config (YAML), e.g. examples/quickstart.yaml")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars (CI)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("report", help="(re)write the report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("calibrate", help="fit an energy profile from measured GEMM and bandwidth sweeps (needs a meter)")
    p.add_argument("--device", default="cuda", help="torch device to run the sweeps on (default cuda)")
    p.add_argument("--formats", nargs="+", default=["fp32", "bf16"], help="formats of the GEMM sweeps")
    p.add_argument("--min-seconds", type=float, default=1.0, help="measure each workload at least this long")
    p.add_argument("--out", default="calibrated.toml", help="profile file to write")
    p.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AdaprecError as e:
        print(f"adaprec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
