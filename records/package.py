#!/usr/bin/env python3
"""Turn train_gpt.py run logs (one per seed) into a leaderboard submission folder.

    python3 records/package.py logs/s1.txt logs/s2.txt logs/s3.txt --name NAME --author AUTHOR \\
        --github-id ID --track track_10min_16mb --baseline-bpb 1.0810 [--baseline-loss 2.7900] \\
        [--baseline-scores 1.0807,1.0812,1.0811] [--blurb TEXT] [--date YYYY-MM-DD] [--out DIR] \\
        [--requirements requirements.txt] [--train-script train_gpt.py] [--hardware "8xH100 80GB SXM"]

writes <out>/<track>/<date>_<name>/ (out: ~/pgolf-submissions unless --out says otherwise) with README.md,
submission.json, train_seed<SEED>.log per log, train_gpt.py packed from --train-script (train_gpt's
packed_source(): the file the challenge counts and runs), requirements.txt, install_gpu.sh and
training_curves.png; SMOKE packages also get data/smoke_corpus.py and data/shard_format.py, so that SMOKE=1
runs there. Every check runs first (final_summary present, artifact <= 16,000,000 bytes, train and eval
<= 600 s, every log's code_sha256 and code_bytes those of the packed file written, distinct seeds, same
config apart from SEED/RUN_ID/paths, no SMOKE logs in the project's records/); any failure is listed and
nothing is written.

Significance: a one-sided t-test of the per-seed final scores against the baseline less the challenge's
0.005-nat margin, at p < 0.01 (see significance()). It is reported, never a reason to refuse packaging.
"""
from __future__ import annotations

import argparse, ast, datetime, hashlib, json, math, re, shlex, shutil, statistics, sys, tempfile
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlog import Run, plot_runs  # noqa: E402

ARTIFACT_CAP = 16_000_000       # bytes, code + compressed model
TIME_CAP = 600.0                # seconds, training and evaluation each
MARGIN = 0.005                  # nats: the improvement over the standing record the challenge requires
ALPHA = 0.01                    # ... shown at p < ALPHA
PER_RUN_KEYS = {"SEED", "RUN_ID", "DATA_PATH", "TOKENIZER_PATH"}  # may differ between the seeds' configs
SUMMARY_KEYS = ("val_bpb", "val_loss", "artifact_bytes", "code_bytes", "code_sha256", "steps", "train_seconds",
                "eval_seconds", "world_size", "config")
PLOT = "training_curves.png"
INSTALL = "install_gpu.sh"  # tools/install_gpu.sh, copied beside train_gpt.py
ROOT = Path(__file__).resolve().parents[1]
PROJECT_RECORDS = ROOT / "records"    # real FineWeb packages only (records/README.md)
DEFAULT_OUT = Path.home() / "pgolf-submissions"
SMOKE_FILES = ("data/smoke_corpus.py", "data/shard_format.py")  # what SMOKE=1 loads from beside train_gpt.py
PACKED_MARKER = b"\nREADABLE_SOURCE_BYTES="  # the packed file's second line (train_gpt's packed_source)

# ----------------------------------------------------------------------------------------------
# Significance
# ----------------------------------------------------------------------------------------------

def significance(scores, baseline, baseline_scores=None, margin=MARGIN, alpha=ALPHA):
    """One-sided test that the mean score beats the baseline by more than the margin (lower is better):
    H0: mean(scores) >= baseline - margin   vs   H1: mean(scores) < baseline - margin.
    One baseline value: scipy's one-sample t-test against baseline - margin (df = n - 1). Per-seed baseline
    values: scipy's Welch test against those values less the margin (shifting them moves their mean by the
    margin and leaves their variance as it is), Welch-Satterthwaite df."""
    n, mean = len(scores), statistics.fmean(scores)
    out = dict(n=n, mean=mean, std=statistics.stdev(scores) if n > 1 else None, margin=margin, alpha=alpha)
    if baseline_scores:
        nb, mb = len(baseline_scores), statistics.fmean(baseline_scores)
        vb = statistics.variance(baseline_scores)
        out.update(kind="Welch two-sample", baseline=mb, baseline_n=nb, baseline_std=math.sqrt(vb))
    else:
        nb, mb, vb = None, baseline, 0.0
        out.update(kind="one-sample", baseline=mb, baseline_n=None, baseline_std=None)
    out["threshold"] = mb - margin
    if n < 2:
        return dict(out, t=None, df=None, p=None, significant=False)
    if out["std"] == 0 and vb == 0:  # no spread at all (identical scores): decided by the sign alone
        below = mean < out["threshold"]
        return dict(out, t=-math.inf if below else math.inf, df=n - 1, p=0.0 if below else 1.0, significant=below)
    if baseline_scores:
        res = stats.ttest_ind(scores, [b - margin for b in baseline_scores], equal_var=False, alternative="less")
    else:
        res = stats.ttest_1samp(scores, out["threshold"], alternative="less")
    p = float(res.pvalue)
    return dict(out, t=float(res.statistic), df=float(res.df), p=p, significant=p < alpha)


def describe_test(sig, metric):
    unit = "nats" if metric == "val_loss" else "bpb"
    base = (f"baseline {sig['baseline']:.5f}" if sig["baseline_n"] is None else
            f"baseline mean {sig['baseline']:.5f} (std {sig['baseline_std']:.5f}, {sig['baseline_n']} runs)")
    seeds = f"{sig['n']} seed{'s' * (sig['n'] > 1)}"
    head = (f"{sig['kind']} t-test, one-sided, on {metric} over {seeds}: mean {sig['mean']:.5f} vs {base} "
            f"- margin {sig['margin']} {unit} = {sig['threshold']:.5f}; "
            f"H0: mean >= {sig['threshold']:.5f}, H1: mean < {sig['threshold']:.5f}: ")
    if sig["t"] is None:
        return head + "not testable with fewer than 2 seeds."
    verdict = "significant" if sig["significant"] else "NOT significant"
    return head + f"t = {sig['t']:.3f}, df = {sig['df']:.2f}, p = {sig['p']:.2g} -> {verdict} at p < {sig['alpha']}."

# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def load_packer(source, path):
    """The script's own packed_source(), compiled alone: importing the script would import torch (and register
    its custom ops a second time in a process that imported train_gpt already). None if it has none."""
    tree = ast.parse(source)
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "packed_source"), None)
    if fn is None:
        return None
    namespace = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["packed_source"]


def pack(script):
    """(packed train_gpt.py, None) from the readable script, or (None, the reason it cannot be packed)."""
    if not script.is_file():
        return None, f"{script}: no such file"
    code = script.read_bytes()
    if PACKED_MARKER in code[:200]:
        return None, f"{script}: already packed (it sets READABLE_SOURCE_BYTES); pass the readable train_gpt.py"
    try:
        packer = load_packer(code, script)
    except SyntaxError as e:
        return None, f"{script}: not Python ({e})"
    if packer is None:
        return None, f"{script}: has no packed_source(); not a train_gpt.py this packager can pack"
    return packer(code), None


def validate(paths, runs, script, packed, requirements, out_dir):
    """Every problem, one line each, naming the log; an empty list means the package can be written.
    packed: the packed train_gpt.py that will be written (None when the script could not be packed)."""
    errors = []
    if not requirements.is_file():
        errors.append(f"{requirements}: no such file")
    if out_dir.exists():
        errors.append(f"{out_dir}: already exists; not overwriting")
    sha = hashlib.sha256(packed).hexdigest() if packed is not None else None
    seen_seed, first = {}, None
    for path, run in zip(paths, runs):
        if run is None:
            errors.append(f"{path}: no such file")
            continue
        s = run.summary
        if s is None:
            errors.append(f"{path}: {run.summary_error}")
            continue
        missing = [k for k in SUMMARY_KEYS if k not in s]
        if missing:
            errors.append(f"{path}: final_summary lacks {', '.join(missing)}")
            continue
        if s["artifact_bytes"] > ARTIFACT_CAP:
            errors.append(f"{path}: artifact_bytes {s['artifact_bytes']:,} > {ARTIFACT_CAP:,}")
        for key in ("train_seconds", "eval_seconds"):
            if s[key] > TIME_CAP:
                errors.append(f"{path}: {key} {s[key]} > {TIME_CAP:.0f}")
        if sha is not None and s["code_sha256"] != sha:
            errors.append(f"{path}: code_sha256 {s['code_sha256'][:12]}... is not the sha256 of {script} packed "
                          f"({sha[:12]}...): the log comes from another version of the script (or another "
                          "Python / liblzma packed it differently)")
        if packed is not None and s["code_bytes"] != len(packed):
            errors.append(f"{path}: code_bytes {s['code_bytes']} != {len(packed)} bytes of {script} packed")
        seed = s["config"].get("SEED")
        if seed in seen_seed:
            errors.append(f"{path}: SEED {seed} again (also in {seen_seed[seed]}); seeds must be distinct")
        seen_seed.setdefault(seed, path)
        if first is None:
            first = (path, s)
            continue
        p0, s0 = first
        if s["world_size"] != s0["world_size"]:
            errors.append(f"{path}: world_size {s['world_size']} != {s0['world_size']} in {p0}")
        for k in sorted(set(s["config"]) | set(s0["config"])):
            if k not in PER_RUN_KEYS and s["config"].get(k) != s0["config"].get(k):
                errors.append(f"{path}: config {k}={s['config'].get(k)!r} differs from {p0} ({s0['config'].get(k)!r})")
    if len({r.summary.get("code_sha256") for r in runs if r and r.summary}) > 1:
        errors.append("logs: code_sha256 differs between the logs: they come from different train_gpt.py versions")
    smoke = [p for p, r in zip(paths, runs) if r and r.summary and r.summary.get("config", {}).get("SMOKE")]
    if smoke and out_dir.resolve().is_relative_to(PROJECT_RECORDS.resolve()):
        errors.append(f"{out_dir}: inside the project's records/, which holds real FineWeb packages only "
                      f"(records/README.md), and these logs are SMOKE=1 runs: {', '.join(map(str, smoke))}; "
                      "pass --out elsewhere")
    return errors

# ----------------------------------------------------------------------------------------------
# The launch command: the config's env vars that differ from train_gpt.py's defaults
# ----------------------------------------------------------------------------------------------

def script_defaults(source):
    """Defaults read statically from the script: each `self._int/_float/_flag/_str/_layers("NAME", default,
    ...)` call whose default is a literal or a module-level literal constant, SMOKE_DEFAULTS, and the
    module-level literal constants. Variables without a readable default (RUN_ID) are always stated."""
    tree = ast.parse(source)
    consts, smoke = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "SMOKE_DEFAULTS" and isinstance(node.value, ast.Call):
                smoke = {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}
                continue
            try:
                consts[name] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                pass
    defaults = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and len(node.args) >= 2
                and node.func.attr in ("_int", "_float", "_flag", "_str", "_layers")
                and isinstance(node.args[0], ast.Constant)):
            arg = node.args[1]
            if isinstance(arg, ast.Name) and arg.id in consts:
                defaults[node.args[0].value] = consts[arg.id]
            else:
                try:
                    defaults[node.args[0].value] = ast.literal_eval(arg)
                except (ValueError, TypeError, SyntaxError):
                    pass
    return defaults, smoke, consts


def same_value(value, default):
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    return str(value).replace(" ", "") == str(default).replace(" ", "")


def launch_env(config, world_size, defaults, smoke_defaults):
    """NAME=value pairs for the settings that differ from the script's defaults (SMOKE's defaults when SMOKE=1).
    Left out: SEED and RUN_ID (per run, given on each command line), GRAD_ACCUM_STEPS when it is the value
    the script derives from the world size (8 // world size), and SMOKE's self-made DATA_PATH/TOKENIZER_PATH."""
    smoke = bool(config.get("SMOKE"))
    eff = dict(defaults, **(smoke_defaults if smoke else {}))
    skip = {"SEED", "RUN_ID"} | ({"DATA_PATH", "TOKENIZER_PATH"} if smoke else set())
    env = []
    for k in sorted(config):
        v = config[k]
        if k in skip or (k == "GRAD_ACCUM_STEPS" and v == max(1, 8 // world_size)):
            continue
        if k in eff and same_value(v, eff[k]):
            continue
        env.append(f"{k}={shlex.quote(str(v))}")
    return env


def launcher(world_size):
    return (f"torchrun --standalone --nproc_per_node={world_size} train_gpt.py" if world_size > 1
            else "python3 train_gpt.py")

# ----------------------------------------------------------------------------------------------
# Writing the package
# ----------------------------------------------------------------------------------------------

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


COLUMNS = [  # header, summary key, format
    ("val_bpb", "val_bpb", ".5f"), ("val_loss (nats)", "val_loss", ".5f"), ("prequant bpb", "val_bpb_prequant", ".5f"),
    ("roundtrip bpb", "val_bpb_roundtrip", ".5f"), ("sliding bpb", "val_bpb_sliding", ".5f"),
    ("ttt bpb", "val_bpb_ttt", ".5f"), ("steps", "steps", ",.0f"), ("step_ms", "step_ms", ".1f"),
    ("train s", "train_seconds", ".1f"), ("eval s", "eval_seconds", ".1f"),
    ("artifact bytes", "artifact_bytes", ",.0f")]


def results_table(runs):
    rows = ["| seed | RUN_ID | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
            "| --- " * (len(COLUMNS) + 2) + "|"]
    for r in runs:
        s = r.summary
        rows.append(f"| {r.seed} | {s['config'].get('RUN_ID')} | "
                    + " | ".join(fmt(s.get(k), f) for _, k, f in COLUMNS) + " |")
    stats = [mean_std([r.summary.get(k) for r in runs]) for _, k, _ in COLUMNS]
    rows.append("| **mean** | | " + " | ".join(fmt(m, f) for (m, _), (_, _, f) in zip(stats, COLUMNS)) + " |")
    rows.append("| std | | " + " | ".join(fmt(sd, f) for (_, sd), (_, _, f) in zip(stats, COLUMNS)) + " |")
    return "\n".join(rows)


def margin_note(runs, metric):
    if metric == "val_loss":
        return "The margin is the challenge's 0.005 nats, applied to val_loss as the rule states."
    ratio = statistics.fmean(r.summary["val_bpb"] / r.summary["val_loss"] for r in runs)
    eq = MARGIN * ratio
    return (f"Only a bpb baseline was given, so the test runs on val_bpb and the 0.005 margin is applied in bpb "
            f"units: an approximation of the rule, which asks for 0.005 nats of val_loss. On these logs 1 nat of "
            f"val_loss is {ratio:.4f} bpb (val_bpb / val_loss, the tokenizer's bytes per token), so 0.005 nats is "
            f"{eq:.5f} bpb and this test is {'stricter' if eq < MARGIN else 'looser'} than the rule. "
            f"Pass --baseline-loss (the record's val_loss) for the exact test.")


UNPACK = ("python3 -c \"import lzma,base64;print(lzma.decompress(base64.b85decode("
          "open('train_gpt.py').read().split('\\\"')[1])).decode())\"")  # the base85 string: the file's only quotes


def write_readme(args, runs, sig, metric, env, consts, folder_files, readable):
    s0, n = runs[0].summary, len(runs)
    cfg, ws = s0["config"], s0["world_size"]
    bpb, bpb_sd = mean_std([r.summary["val_bpb"] for r in runs])
    loss, _ = mean_std([r.summary["val_loss"] for r in runs])
    art = max(r.summary["artifact_bytes"] for r in runs)
    L = [f"# {args.name}", "",
         f"**val_bpb {bpb:.5f}** (mean of {n} seed{'s' * (n > 1)}" + (f", std {bpb_sd:.5f}" if bpb_sd else "")
         + f") | val_loss {loss:.5f} nats | artifact at most {art:,} bytes (code {s0['code_bytes']:,}) | "
         f"world size {ws}, train at most {max(r.summary['train_seconds'] for r in runs):.0f} s, "
         f"eval at most {max(r.summary['eval_seconds'] for r in runs):.0f} s", ""]
    if args.blurb:
        L += [args.blurb, ""]
    if cfg.get("SMOKE"):
        L += ["> **These are SMOKE=1 runs** (a tiny self-made corpus, not FineWeb): a test of the packaging, "
              "not a leaderboard result.", ""]
    L += ["## Results", "", f"Author {args.author} (@{args.github_id}), {args.date}. Per seed, from each log's "
          "`final_summary`; val_bpb / val_loss are the final score (TTT if on, else sliding, else roundtrip).", "",
          results_table(runs), "", f"![training curves]({PLOT})", "",
          "## Significance", "", describe_test(sig, metric), "",
          f"Comparison: mean {metric} {sig['mean']:.5f} vs baseline {sig['baseline']:.5f}: "
          f"{sig['mean'] - sig['baseline']:+.5f}. " + margin_note(runs, metric), "",
          "## Launch", "",
          f"train_gpt.py (sha256 `{s0['code_sha256']}`, {s0['code_bytes']:,} bytes, the code the artifact "
          "counts), run from this folder. Settings that differ from train_gpt.py's defaults"
          + (" (SMOKE's defaults, as SMOKE=1)" if cfg.get("SMOKE") else "")
          + "; the full resolved configuration is below.", ""]
    L += (["    export " + " ".join(env)] if env else []) + [
        f"    SEED={r.seed} RUN_ID={shlex.quote(str(r.config.get('RUN_ID')))} {launcher(ws)}" for r in runs]
    L += ["", "## Code", "", f"train_gpt.py is packed: a three-line program that decompresses (LZMA, base85) and runs "
          f"the readable train_gpt.py of sha256 `{hashlib.sha256(readable).hexdigest()}` ({len(readable):,} bytes) "
          "with its docstrings and comments removed. To read what it runs:", "", f"    {UNPACK}"]
    L += ["", "## Setup", "", "    pip install -r requirements.txt",
          "    bash install_gpu.sh   # the optional GPU kernels: mamba-ssm's Triton SSD, causal-conv1d, FA3"]
    if cfg.get("SMOKE"):
        L += ["", "SMOKE=1 builds its own tiny corpus and tokenizer (data/smoke_corpus.py, here for that); "
              "no data download."]
    else:
        hint = consts.get("DOWNLOAD_HINT")
        if hint and "VOCAB_SIZE" in cfg:
            hint = re.sub(r"--variant sp\d+", f"--variant sp{cfg['VOCAB_SIZE']}", hint)
        L += ([f"    {hint}"] if hint else []) + [
            "", f"The runs read DATA_PATH=`{cfg.get('DATA_PATH')}` and TOKENIZER_PATH=`{cfg.get('TOKENIZER_PATH')}`"
            " (relative to the folder they were launched from); the download writes them under data/."]
    same = (f"; the other seeds differ only in {', '.join(sorted(PER_RUN_KEYS))} (checked)" if n > 1 else "")
    L += ["", "## Configuration", "", f"Resolved by train_gpt.py, from the first seed's log{same}.", "",
          "```json", json.dumps(cfg, indent=1, sort_keys=True), "```", "", "## Files", ""]
    return "\n".join(L + [f"- `{f}`" for f in folder_files] + [""])


def submission(args, runs, sig, metric):
    """The key set of the challenge's recent records/track_10min_16mb/*/submission.json (author, github_id, name,
    blurb, date, track, val_loss, val_bpb, *_std, seeds, seed_results, bytes_total, bytes_code, compliance)
    plus the significance test. bytes_total is the largest artifact over the seeds (each must fit)."""
    S = [r.summary for r in runs]
    bpb, bpb_sd = mean_std([s["val_bpb"] for s in S])
    loss, loss_sd = mean_std([s["val_loss"] for s in S])
    r8 = lambda v: None if v is None else round(v, 8)  # noqa: E731
    out = dict(
        author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb or "", date=args.date,
        track=args.track.removeprefix("track_"), val_loss=r8(loss), val_bpb=r8(bpb), val_loss_std=r8(loss_sd),
        val_bpb_std=r8(bpb_sd), seeds=[r.seed for r in runs],
        seed_results={str(r.seed): dict(val_loss=r8(s["val_loss"]), val_bpb=r8(s["val_bpb"]),
                                        artifact_bytes=s["artifact_bytes"], steps=s["steps"],
                                        train_time_s=s["train_seconds"], eval_time_s=s["eval_seconds"])
                      for r, s in zip(runs, S)},
        bytes_total=max(s["artifact_bytes"] for s in S), bytes_code=S[0]["code_bytes"],
        compliance=dict(train_under_600s=all(s["train_seconds"] <= TIME_CAP for s in S),
                        artifact_under_16mb=all(s["artifact_bytes"] <= ARTIFACT_CAP for s in S),
                        eval_under_600s=all(s["eval_seconds"] <= TIME_CAP for s in S), three_seeds=len(S) >= 3),
        comparison_baseline_bpb=args.baseline_bpb, delta_vs_baseline_bpb=r8(bpb - args.baseline_bpb))
    if args.baseline_loss is not None:
        out.update(comparison_baseline_loss=args.baseline_loss, delta_vs_baseline_nats=r8(loss - args.baseline_loss))
    out.update(significance_test=f"{sig['kind']} one-sided t-test on {metric}, margin {MARGIN}",
               t_statistic=r8(sig["t"]) if sig["t"] is not None and math.isfinite(sig["t"]) else None,
               df=r8(sig["df"]), p_value=sig["p"], significant=sig["significant"])
    if args.hardware:
        out["hardware"] = args.hardware
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path, help="logs/<RUN_ID>.txt, one per seed")
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--track", required=True, help="e.g. track_10min_16mb")
    ap.add_argument("--baseline-bpb", type=float, required=True, help="the standing record's val_bpb")
    ap.add_argument("--baseline-loss", type=float, help="its val_loss (nats): the test then runs on val_loss")
    ap.add_argument("--baseline-scores", help="its per-seed scores, comma-separated, in the tested unit "
                    "(val_loss if --baseline-loss, else val_bpb): Welch's two-sample test")
    ap.add_argument("--blurb", default="")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where <track>/<date>_<name>/ goes (default "
                    f"{DEFAULT_OUT}); the project's records/ is for real FineWeb packages only")
    ap.add_argument("--requirements", type=Path, default=Path("requirements.txt"))
    ap.add_argument("--train-script", type=Path, default=Path("train_gpt.py"))
    ap.add_argument("--hardware", help="e.g. '8xH100 80GB SXM' (the logs do not say)")
    args = ap.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        ap.error(f"--date {args.date!r}: expected YYYY-MM-DD")
    if args.baseline_scores is not None:
        try:
            args.baseline_scores = [float(v) for v in args.baseline_scores.split(",") if v.strip()]
        except ValueError:
            ap.error(f"--baseline-scores {args.baseline_scores!r}: expected numbers separated by commas")
        if len(args.baseline_scores) < 2:
            ap.error("--baseline-scores needs at least 2 values (one value: use --baseline-bpb/--baseline-loss)")
    if not re.sub(r"[^A-Za-z0-9._-]+", "", args.track) == args.track or not args.track:
        ap.error(f"--track {args.track!r}: expected a folder name such as track_10min_16mb")
    return args


def main(argv=None):
    args = parse_args(argv)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.name).strip("_") or "submission"
    out_dir = args.out / args.track / f"{args.date}_{slug}"
    runs = [Run(p) if p.is_file() else None for p in args.logs]
    packed, pack_error = pack(args.train_script)
    errors = ([pack_error] if pack_error else []) + validate(args.logs, runs, args.train_script, packed,
                                                             args.requirements, out_dir)
    if errors:
        print(f"error: {len(errors)} problem{'s' * (len(errors) > 1)}; nothing written:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1

    metric = "val_loss" if args.baseline_loss is not None else "val_bpb"
    baseline = args.baseline_loss if metric == "val_loss" else args.baseline_bpb
    sig = significance([r.summary[metric] for r in runs], baseline, args.baseline_scores)
    defaults, smoke_defaults, consts = script_defaults(args.train_script.read_text())
    env = launch_env(runs[0].summary["config"], runs[0].summary["world_size"], defaults, smoke_defaults)
    logs = [f"train_seed{r.seed}.log" for r in runs]
    smoke = bool(runs[0].summary["config"].get("SMOKE"))
    files = ["README.md", "submission.json", *logs, "train_gpt.py", "requirements.txt", INSTALL, PLOT,
             *(SMOKE_FILES if smoke else ())]

    # Build in a scratch folder and move it into place at the end: a failure midway leaves nothing behind.
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / out_dir.name
        stage.mkdir()
        for r, name in zip(runs, logs):
            shutil.copyfile(r.path, stage / name)
        (stage / "train_gpt.py").write_bytes(packed)
        shutil.copyfile(args.requirements, stage / "requirements.txt")
        shutil.copyfile(ROOT / "tools" / INSTALL, stage / INSTALL)
        for name in SMOKE_FILES if smoke else ():
            (stage / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(ROOT / name, stage / name)
        plot_runs(runs, stage / PLOT, title=args.name, labels=[f"seed {r.seed}" for r in runs])
        (stage / "submission.json").write_text(json.dumps(submission(args, runs, sig, metric), indent=2) + "\n")
        (stage / "README.md").write_text(write_readme(args, runs, sig, metric, env, consts, files,
                                                      args.train_script.read_bytes()))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), str(out_dir))

    if smoke:
        print("warning: these are SMOKE=1 runs, not FineWeb results (the README says so)", file=sys.stderr)
    print(f"wrote {out_dir}/: {', '.join(files)}")
    print(describe_test(sig, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
