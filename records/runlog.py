"""Reading train_gpt.py's logs (logs/<RUN_ID>.txt) and plotting them; shared by package.py and plot_runs.py.

The line formats are train_gpt.py's (see its main() and train_loop()):
    config {json}
    step:200/20000 train_loss:4.3475 step_ms:208.6 tok/s:628,240 train_time:42s eta:63s
    step:100/300 val_loss:0.8480 val_bpb:0.6000
    training stopped at step 300 after 88.3s (294.4 ms/step)
    prequant|roundtrip|sliding window:2048 stride:64|ttt val_loss:.. val_bpb:..
    final_summary {json}                      (the last line of a finished run)
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

STEP_RE = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) step_ms:(\S+) .*train_time:(\S+)s")
VAL_RE = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+)")
STOP_RE = re.compile(r"^training stopped at step (\d+) after (\S+)s")
EVAL_RE = re.compile(r"^(prequant|roundtrip|sliding|ttt)\b.*? val_loss:(\S+) val_bpb:(\S+)")


class Run:
    """One log: the config, training and validation curves, the final evaluations and final_summary."""

    def __init__(self, path):
        self.path = Path(path)
        self.lines = self.path.read_text(errors="replace").splitlines()
        self.config, self.summary, self.summary_error = {}, None, None
        self.steps, self.vals, self.evals, self.stopped = [], [], {}, None
        for line in self.lines:
            if line.startswith("config {"):
                self.config = json.loads(line[len("config "):])
            elif m := STEP_RE.match(line):
                step, loss, step_ms, _ = m.groups()
                self.steps.append((int(step), float(loss), float(step_ms)))
            elif m := VAL_RE.match(line):
                self.vals.append((int(m[1]), float(m[2]), float(m[3])))
            elif m := STOP_RE.match(line):
                self.stopped = (int(m[1]), float(m[2]))
            elif m := EVAL_RE.match(line):
                self.evals[m[1]] = (float(m[2]), float(m[3]))
        last = next((l for l in reversed(self.lines) if l.strip()), "")
        if last.startswith("final_summary "):
            try:
                self.summary = json.loads(last[len("final_summary "):])
                self.config = self.summary.get("config", self.config)
            except json.JSONDecodeError as e:
                self.summary_error = f"final_summary is not valid JSON ({e})"
        else:
            self.summary_error = "no final_summary line at the end (unfinished or crashed run?)"

    @property
    def seed(self):
        return self.config.get("SEED")

    def anchors(self):
        """(step, training seconds) points. A step line's step_ms is the training clock divided by the step
        (validation is paused out of that clock), so step * step_ms is the elapsed training time, to 0.1 ms per
        step: finer than its train_time field, which is rounded to whole seconds."""
        pts = [(0, 0.0)] + [(s, s * ms / 1000) for s, _, ms in self.steps]
        if self.stopped:
            pts.append(self.stopped)
        return sorted(set(pts))

    def seconds_at(self, step):
        """Training seconds at a step. Val lines carry no time; a val line at step N comes right after the step
        line of step N whenever VAL_LOSS_EVERY is a multiple of TRAIN_LOG_EVERY (the usual setting), and the
        exact time is then known. Otherwise interpolate linearly between the nearest step lines on either side
        (steps take near-constant time), or extend at the last step_ms beyond the last one."""
        pts = self.anchors()
        for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
            if s0 <= step <= s1:
                return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
        s_last, t_last = pts[-1]
        return t_last + (step - s_last) * (self.steps[-1][2] / 1000 if self.steps else 0.0)


def smoothed(values, window):
    """Centred moving average over `window` points (fewer at the ends): the loss of one batch is noisy and
    its trend is what the plot is for. Centred, so that it does not lag behind a fast early drop the way
    an exponential average does."""
    half = max(int(window), 1) // 2
    return [statistics.fmean(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def default_labels(runs):
    """Short legend names: 'seed N' when the seeds tell the runs apart, else each RUN_ID (or the file name)."""
    seeds = [r.seed for r in runs]
    if None not in seeds and len(set(seeds)) == len(seeds):
        return [f"seed {s}" for s in seeds]
    return [str(r.config.get("RUN_ID", r.path.stem)) for r in runs]


def plot_runs(runs, out_path, title=None, labels=None):
    """Two panels against training wall-clock seconds, both on a log scale: train loss (each logged step
    faint, its centred moving average solid) and validation bpb (the periodic val lines joined, a star for the
    final score at train_seconds). One colour per run, labelled `labels` (default_labels if None)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    labels = list(labels) if labels is not None else default_labels(runs)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"
        if run.steps:
            t = [s * ms / 1000 for s, _, ms in run.steps]
            loss = [l for _, l, _ in run.steps]
            ax_loss.plot(t, loss, color=color, alpha=0.25, lw=0.8)
            ax_loss.plot(t, smoothed(loss, len(loss) / 15), color=color, lw=1.8, label=label)
        if run.vals:
            ax_bpb.plot([run.seconds_at(s) for s, _, _ in run.vals], [b for _, _, b in run.vals],
                        "o-", color=color, ms=4, label=f"{label} val")
        if run.summary:
            ax_bpb.plot([run.summary["train_seconds"]], [run.summary["val_bpb"]], "*", color=color, ms=12,
                        label=f"{label} final {run.summary['val_bpb']:.4f}")
    ax_loss.set(xlabel="training time (s)", ylabel="train loss (nats)", title="train loss (faint: each logged step)")
    ax_bpb.set(xlabel="training time (s)", ylabel="val bpb", title="validation bpb (star: final score)")
    for ax in (ax_loss, ax_bpb):
        ax.set_yscale("log")
        # plain numbers on the log axis: the ranges are narrow (well under a decade), so label the minor ticks too
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(LogLocator(subs="all"))
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title or ("Training curves" + (" (SMOKE=1: tiny synthetic corpus, not FineWeb)"
                                                if any(r.config.get("SMOKE") for r in runs) else "")))
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
