#!/usr/bin/env python3
"""Turn train_gpt.py run logs (one per seed) into a leaderboard submission folder.

    python3 records/package.py logs/s1.txt logs/s2.txt logs/s3.txt --name NAME --author AUTHOR \\
        --github-id ID --track track_10min_16mb --baseline-bpb 1.0810 [--baseline-loss 2.7900] \\
        [--baseline-scores 1.0807,1.0812,1.0811] [--blurb TEXT] [--date YYYY-MM-DD] [--out records] \\
        [--requirements requirements.txt] [--train-script train_gpt.py] [--hardware "8xH100 80GB SXM"]

writes <out>/<track>/<date>_<name>/ with README.md, submission.json, train_seed<SEED>.log per log,
train_gpt.py, requirements.txt and training_curves.png. Every check runs first (final_summary present,
artifact <= 16,000,000 bytes, train and eval <= 600 s, one train_gpt.py for all logs and it is the one copied,
distinct seeds, same config apart from SEED/RUN_ID/paths); any failure is listed and nothing is written.

Significance: a one-sided t-test of the per-seed final scores against the baseline less the challenge's
0.005-nat margin, at p < 0.01 (see significance()). It is reported, never a reason to refuse packaging.
"""
from __future__ import annotations

import argparse, ast, datetime, hashlib, json, math, re, shlex, shutil, statistics, sys, tempfile
from pathlib import Path

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

# ----------------------------------------------------------------------------------------------
# Student's t distribution (no scipy): CDF through the regularized incomplete beta function
# ----------------------------------------------------------------------------------------------

def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b), by its continued fraction evaluated with the modified Lentz
    method. The fraction converges fast for x < (a + 1) / (a + b + 2); above that use I_x(a,b) = 1 - I_{1-x}(b,a)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # I_x(a,b) = front / a * 1/(1 + d1/(1 + d2/(1 + ...))), with
    #   d(2m+1) = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)),   d(2m) = m(b-m)x / ((a+2m-1)(a+2m)).
    # Lentz: f = b0 + a1/(b1 + a2/(b2 + ...)) with b0 = 0 (kept at `tiny`), a1 = 1, a(k+1) = d(k), b(k) = 1.
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for k in range(1, 400):
        if k == 1:
            num = 1.0
        elif k % 2 == 0:   # a(k) = d(k-1), k-1 = 2m+1 odd
            m = k // 2 - 1
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:              # a(k) = d(k-1), k-1 = 2m even
            m = k // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * f / a


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (any real df > 0)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))   # P(T <= -|t|)
    return tail if t < 0 else 1.0 - tail


def significance(scores, baseline, baseline_scores=None, margin=MARGIN, alpha=ALPHA):
    """One-sided test that the mean score beats the baseline by more than the margin (lower is better):
    H0: mean(scores) >= baseline - margin   vs   H1: mean(scores) < baseline - margin.
    One baseline value: one-sample t-test, t = (mean - (baseline - margin)) / (s / sqrt(n)), df = n - 1.
    Per-seed baseline values: Welch's two-sample test, t = (mean - mean_b + margin) / sqrt(s^2/n + s_b^2/n_b),
    with Welch-Satterthwaite df. p = P(T <= t)."""
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
    var_term = out["std"] ** 2 / n
    se2 = var_term + (vb / nb if nb else 0.0)
    diff = mean - out["threshold"]
    if se2 == 0:   # no spread at all (identical scores): decided by the sign alone
        t, df, p = (-math.inf, n - 1, 0.0) if diff < 0 else (math.inf, n - 1, 1.0)
    else:
        t = diff / math.sqrt(se2)
        df = se2 ** 2 / (var_term ** 2 / (n - 1) + (vb / nb) ** 2 / (nb - 1)) if nb else n - 1
        p = t_cdf(t, df)
    return dict(out, t=t, df=df, p=p, significant=p < alpha)


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

def validate(paths, runs, script, requirements, out_dir):
    """Every problem, one line each, naming the log; an empty list means the package can be written."""
    errors = []
    for p in (script, requirements):
        if not p.is_file():
            errors.append(f"{p}: no such file")
    if out_dir.exists():
        errors.append(f"{out_dir}: already exists; not overwriting")
    code = script.read_bytes() if script.is_file() else None
    sha = hashlib.sha256(code).hexdigest() if code is not None else None
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
            errors.append(f"{path}: code_sha256 {s['code_sha256'][:12]}... is not the sha256 of {script} "
                          f"({sha[:12]}...): the log comes from another version of the script")
        if code is not None and s["code_bytes"] != len(code):
            errors.append(f"{path}: code_bytes {s['code_bytes']} != {len(code)} bytes of {script}")
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


def write_readme(args, runs, sig, metric, env, consts, folder_files):
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
          f"train_gpt.py (sha256 `{s0['code_sha256']}`), run from this folder. Settings that differ from "
          "train_gpt.py's defaults" + (" (SMOKE's defaults, as SMOKE=1)" if cfg.get("SMOKE") else "")
          + "; the full resolved configuration is below.", ""]
    L += (["    export " + " ".join(env)] if env else []) + [
        f"    SEED={r.seed} RUN_ID={shlex.quote(str(r.config.get('RUN_ID')))} {launcher(ws)}" for r in runs]
    L += ["", "## Setup", "", "    pip install -r requirements.txt",
          "    bash install_gpu.sh   # the optional GPU kernels: mamba-ssm's Triton SSD, causal-conv1d, FA3"]
    if cfg.get("SMOKE"):
        L += ["", "SMOKE=1 builds its own tiny corpus and tokenizer; no data download."]
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
    ap.add_argument("--out", type=Path, default=Path("records"))
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
    errors = validate(args.logs, runs, args.train_script, args.requirements, out_dir)
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
    files = ["README.md", "submission.json", *logs, "train_gpt.py", "requirements.txt", INSTALL, PLOT]

    # Build in a scratch folder and move it into place at the end: a failure midway leaves nothing behind.
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / out_dir.name
        stage.mkdir()
        for r, name in zip(runs, logs):
            shutil.copyfile(r.path, stage / name)
        shutil.copyfile(args.train_script, stage / "train_gpt.py")
        shutil.copyfile(args.requirements, stage / "requirements.txt")
        shutil.copyfile(Path(__file__).resolve().parents[1] / "tools" / INSTALL, stage / INSTALL)
        plot_runs(runs, stage / PLOT, title=args.name)
        (stage / "submission.json").write_text(json.dumps(submission(args, runs, sig, metric), indent=2) + "\n")
        (stage / "README.md").write_text(write_readme(args, runs, sig, metric, env, consts, files))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), str(out_dir))

    if runs[0].summary["config"].get("SMOKE"):
        print("warning: these are SMOKE=1 runs, not FineWeb results (the README says so)", file=sys.stderr)
    print(f"wrote {out_dir}/: {', '.join(files)}")
    print(describe_test(sig, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
