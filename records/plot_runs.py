#!/usr/bin/env python3
"""Plot train loss and validation bpb against training wall-clock time for one or more train_gpt.py logs.

    python3 records/plot_runs.py logs/a.txt logs/b.txt -o runs.png [--label hybrid --label attention] [--title T]

Unfinished logs work too (no final_summary needed). One colour per log, labelled by --label (once per log, in
order), else "seed N" when the seeds differ, else the RUN_ID. Both panels are on a log scale; the train loss
is drawn faint as logged and solid as a centred moving average.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlog import Run, plot_runs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("runs.png"))
    ap.add_argument("--title", help="the figure's title (default: 'Training curves', marked when SMOKE)")
    ap.add_argument("--label", action="append", help="a short legend name, once per log, in the logs' order")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print("error: no such log: " + ", ".join(missing), file=sys.stderr)
        return 2
    if args.label is not None and len(args.label) != len(args.logs):
        print(f"error: {len(args.label)} --label for {len(args.logs)} logs: give one per log, in order", file=sys.stderr)
        return 2
    runs = [Run(p) for p in args.logs]
    plot_runs(runs, args.out, args.title, args.label)
    print(f"wrote {args.out} ({len(runs)} run{'s' * (len(runs) > 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
