#!/usr/bin/env python3
"""Plot train loss and validation bpb against training wall-clock time for one or more train_gpt.py logs.

    python3 records/plot_runs.py logs/a.txt logs/b.txt -o runs.png

Unfinished logs work too (no final_summary needed); one line per log, labelled by seed and RUN_ID.
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
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print("error: no such log: " + ", ".join(missing), file=sys.stderr)
        return 2
    runs = [Run(p) for p in args.logs]
    plot_runs(runs, args.out, args.title)
    print(f"wrote {args.out} ({len(runs)} run{'s' * (len(runs) > 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
