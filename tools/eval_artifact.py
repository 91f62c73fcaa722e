#!/usr/bin/env python3
"""Score a finished run's artifact again under other evaluation settings, without training it again: a longer
context (EVAL_SEQ_LEN), another stride, TTT's settings. Reads the run's config line from logs/<RUN_ID>.txt and
its weights from logs/<RUN_ID>.artifact (where train_gpt.py left them), applies the VAR=value settings given,
then runs train_gpt.py's own final evaluation: the roundtrip (which must repeat the run's own), sliding, TTT.
The last line is `eval_summary {json}`. From the project root, on the machine that holds the run's logs:

    python3 tools/eval_artifact.py hybrid-0-1-10-seed1337 EVAL_SEQ_LEN=4096
    torchrun --standalone --nproc_per_node=8 tools/eval_artifact.py RUN_ID EVAL_SEQ_LEN=8192 TTT_ENABLED=0

Only evaluation settings can change (EVALUATION_KNOBS); a shape knob would not fit the weights. Bad settings, a
missing log or artifact, or missing data stop it at once with one `error:` line each and exit code 2."""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

EVALUATION_KNOBS = ("EVAL_SEQ_LEN", "EVAL_STRIDE", "VAL_BATCH_SIZE", "TTT_ENABLED", "TTT_MODE", "TTT_LR", "TTT_EPOCHS",
                    "TTT_CHUNK_TOKENS", "TTT_MOMENTUM", "TTT_DOC_CHUNK", "TTT_DOC_LR", "TTT_DOC_RANK", "TTT_DOC_BATCH",
                    "TTT_DOC_SSM", "TTT_DOC_PHASES", "TTT_DOC_PREFIX",
                    "COMPILE", "FAST_KERNELS", "REQUIRE_FAST_KERNELS", "DATA_PATH", "TOKENIZER_PATH")


def run_settings(run_id, settings, logs=Path("logs")):
    """(environment for Hyperparameters, problems): the run's resolved config with the settings applied."""
    problems, overrides = [], {}
    for s in settings:
        name, eq, value = s.partition("=")
        if not eq:
            problems.append(f"'{s}' is not a VAR=value setting")
        elif name not in EVALUATION_KNOBS:
            problems.append(f"{name} cannot change after training (the weights are fixed): only "
                            f"{', '.join(EVALUATION_KNOBS)}")
        else:
            overrides[name] = value
    log_path, artifact = logs / f"{run_id}.txt", logs / f"{run_id}.artifact"
    config = None
    if not log_path.is_file():
        problems.append(f"no log {log_path}: give the RUN_ID of a finished train_gpt.py run, from the folder that holds its logs/")
    else:
        line = next((ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("config {")), None)
        if line is None:
            problems.append(f"{log_path} has no 'config {{...}}' line: not a train_gpt.py log")
        else:
            config = json.loads(line[len("config "):])
    if not artifact.is_file():
        problems.append(f"no artifact {artifact}: the run did not finish its export, or ran elsewhere")
    if config is None:
        return None, problems
    env = {k: str(v) for k, v in config.items()}
    env.update(overrides)
    return env, problems


def main():
    if len(sys.argv) < 2 or "=" in sys.argv[1]:
        tg.stop_on_problems([f"usage: {sys.argv[0]} RUN_ID [VAR=value ...] (settings: {', '.join(EVALUATION_KNOBS)})"])
    run_id, settings = sys.argv[1], sys.argv[2:]
    _, rank, _, local_rank = tg.Context.launcher()
    quiet = rank != 0 or local_rank != 0
    env, problems = run_settings(run_id, settings)
    if env is not None:
        hp = tg.Hyperparameters(env, raise_errors=False)
        own = hp.problems()
        problems += own + ([] if own else tg.data_problems(hp, splits=("val",)))  # no training: no train shards
    tg.stop_on_problems(problems, quiet)
    ctx = tg.Context()
    log = print if ctx.is_main else (lambda msg: None)
    t0 = time.time()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    luts = tuple(t.to(ctx.device) for t in tg.build_byte_luts(sp, hp.vocab_size))
    val_tokens = tg.load_validation_tokens(hp.data_path, hp.train_seq_len)
    tg.stop_on_problems(tg.validation_problems(hp, val_tokens, sp.bos_id()), quiet)
    tg.configure_kernels(hp, ctx.device, log)
    model = tg.HybridGPT(hp).to(ctx.device)
    model.bos_id = sp.bos_id()
    model.load_state_dict(tg.deserialize(Path(f"logs/{run_id}.artifact").read_bytes()))
    model.looping = bool(hp.recur_layers)  # as the run evaluated it
    compiled = tg.compile_model(model, hp.compile) if ctx.device.type == "cuda" else model
    log(f"eval_artifact: {run_id} with {' '.join(settings) or 'its own settings'}, {val_tokens.numel():,} tokens, "
        f"windows {hp.eval_seq_len} (loaded in {time.time() - t0:.1f}s)")
    t_eval = time.time()
    scores = tg.final_evaluation(compiled, val_tokens, hp, ctx, luts, log)
    summary = dict(**scores, eval_seconds=round(time.time() - t_eval, 2), artifact_of=run_id, settings=settings,
                   world_size=ctx.world_size, config=hp.resolved)
    log("eval_summary " + json.dumps(summary))
    if ctx.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
