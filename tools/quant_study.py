#!/usr/bin/env python3
"""Measure the export's choices on a trained model, on CPU, in a few minutes: trains a small hybrid on
SMOKE's self-made corpus with train_gpt.py's own loop, collects GPTQ Hessians from training batches, then
reports (1) Hessian-weighted error of GPTQ with full-range vs clipped scales at int6/int5/int4,
(2) fitting under a tighter cap by lowering bit widths vs by pruning +-1 weights (error and val_bpb),
(3) compressors, (4) the embedding's width (val_bpb and bytes at int8/int7/int6), (5) std-based grid steps
(QUANT_SIGMAS, QUANT_EMBED_SIGMAS: bytes against val_bpb), (6) the tied embedding by round to nearest
or by GPTQ on the output head's Hessian, and (7) the artifact as one LZMA stream against its parts
(values, scales, float tensors) compressed apart (as exported), and each part by LZMA with the best
settings or by Brotli (if the brotli package imports), (8) LQER's rank-4 error correction, and (9) val_bpb
with each group of weights (Mamba-2 in_proj, out_proj, attention, MLP, tables) alone quantized, and the Mamba-2
in_proj by role (z, x, B, C, dt rows): each role's share of the Hessian-weighted error, its values' entropy,
and val_bpb with only that role quantized, or with it kept in float while the rest is quantized; (10) fitting a
cap a little under the artifact by lowering whole matrices' bit widths (the export) or by widening every int6
grid step a little.
usage: python3 tools/quant_study.py [--seconds 100] [--threads 2]"""
import argparse, bz2, lzma, sys, tempfile, types, zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seconds", type=float, default=100)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
hp = tg.Hyperparameters({"SMOKE": "1", "MAX_WALLCLOCK_SECONDS": str(a.seconds), "MODEL_DIM": "128",
                         "NUM_LAYERS": "4", "MAMBA_HEADDIM": "32", "MLP_MULT": "3", "ITERATIONS": "400",
                         "WARMDOWN_FRAC": "0.375", "TRAIN_LOG_EVERY": "100"})
root = Path(tempfile.mkdtemp(prefix="quant_study_"))
tg.make_smoke_corpus(root, hp.vocab_size)
hp.data_path, hp.tokenizer_path = str(root), str(root / "smoke.model")
ctx = types.SimpleNamespace(device=torch.device("cpu"), distributed=False, rank=0, world_size=1, is_main=True)
torch.manual_seed(0)
model = tg.HybridGPT(hp)
loader = tg.DistributedTokenLoader(tg.shard_files(hp.data_path, "train"), 0, 1, ctx.device)
steps, ema = tg.train_loop(model, model, tg.build_optimizers(model, hp), loader, hp, ctx, tg.TrainClock(), log=print)
if ema is not None:
    ema.copy_to(model)
state = model.state_dict()
import sentencepiece as spm  # noqa: E402
luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=hp.tokenizer_path), hp.vocab_size)
val = tg.load_validation_tokens(hp.data_path, hp.train_seq_len)


def val_bpb(weights):
    """val_bpb of the model with these (dequantized) weights: plain evaluation of the whole val split."""
    scratch = tg.HybridGPT(hp)
    scratch.load_state_dict(weights)
    return tg.evaluate(scratch, val, hp.train_seq_len, hp.train_seq_len, 32, ctx, luts)[1]


names = [n for n, p in state.items() if tg.quant_kind(n, p) == "int6"]
hessians = tg.collect_hessians(model, [loader.next_batch(hp.train_seq_len * 16, hp.train_seq_len) for _ in range(4)],
                               ctx, names)


def weighted_error(W, Wq, H):
    return float(tg.hessian_row_errors(W - Wq, H).sum())


print(f"\n1. GPTQ Hessian-weighted error, summed over {len(names)} matrices ({steps} training steps)")
for kind in ("int6", "int5", "int4"):
    errs = {}
    for clip in (False, True):
        errs[clip] = sum(weighted_error(state[n].float(), q.float() * s[:, None], hessians[n])
                         for n in names for q, s in [tg.quantize_gptq(state[n].float(), hessians[n], tg.QMAX[kind], clip=clip)])
    print(f"  {kind}: full-range {errs[False]:.1f}  with clip search {errs[True]:.1f} ({errs[True] / errs[False] - 1:+.1%})")

quantized = tg.quantize_model(model, hessians, log=print)
blob = tg.serialize(quantized)
floor = len(tg.serialize({n: (k, q.masked_fill(q.abs() == 1, 0) if k == "int6" else q, s)
                          for n, (k, q, s) in quantized.items()}))
print(f"\n2. fitting a tighter cap: {len(blob):,} model bytes; pruning every +-1 gives {floor:,}")
float_bpb = val_bpb(state)
print(f"  float val_bpb {float_bpb:.4f}; int6 artifact val_bpb {val_bpb(tg.deserialize(blob)):.4f}")
print(f"  {'limit':>9} | {'lower bit widths':>42} | {'prune +-1':>42}")


def prune_to_fit(quantized, limit_bytes):
    """The alternative to lowering bit widths: zero the +-1 int6 values in the rows of smallest scale
    (least output change, and zeros compress best), as few as fit, by bisection on how many."""
    cands = [(s[r], n, r, c) for n, (k, q, s) in quantized.items() if k == "int6"
             for r, c in [torch.nonzero(q.abs() == 1, as_tuple=True)]]
    order = torch.argsort(torch.cat([c[0] for c in cands]))

    def pruned(k):
        chosen, out, start = torch.zeros(len(order), dtype=torch.bool), dict(quantized), 0
        chosen[order[:k]] = True
        for cost, n, r, c in cands:
            sel, start = chosen[start:start + len(cost)], start + len(cost)
            kind, q, s = quantized[n]
            q = q.clone()
            q[r[sel], c[sel]] = 0
            out[n] = (kind, q, s)
        return tg.serialize(out)
    lo, hi = 0, len(order)
    while hi - lo > max(1, len(order) // 200):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(pruned(mid)) <= limit_bytes else (mid, hi)
    return pruned(hi)


def total_error(b):
    after = tg.deserialize(b)
    return sum(weighted_error(state[n].float(), after[n], hessians[n]) for n in names)


base = total_error(blob)
for frac in (0.25, 0.5, 0.95):
    limit = int(len(blob) - frac * (len(blob) - floor))
    bits = tg.fit_to_cap(quantized, model, hessians, limit, log=lambda m: None)
    pruned = prune_to_fit(quantized, limit)
    print(f"  {limit:>9,} | {len(bits):>9,} B error {total_error(bits) / base - 1:+8.1%} "
          f"val_bpb {val_bpb(tg.deserialize(bits)):.4f} | {len(pruned):>9,} B error "
          f"{total_error(pruned) / base - 1:+8.1%} val_bpb {val_bpb(tg.deserialize(pruned)):.4f}")

def raw_bytes(artifact):
    """The artifact's parts (header, values, scales, floats) as serialized before compression, back to back."""
    return b"".join(tg.decompress_part(c, payload, part) for part, chunks in tg.artifact_parts(artifact).items()
                    for c, payload in chunks)


raw = raw_bytes(blob)
print(f"\n3. compressors on the {len(raw):,}-byte serialized model (order-0 entropy estimate "
      f"{int(tg.estimated_bytes(quantized)):,})")
for name, compress in (("LZMA_FILTERS (ours)", lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, filters=tg.LZMA_FILTERS)),
                       ("lzma preset 9", lambda b: lzma.compress(b, preset=9)),
                       ("lzma preset 9e", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)),
                       ("zlib 9", lambda b: zlib.compress(b, 9)), ("bz2 9", lambda b: bz2.compress(b, 9))):
    print(f"  {name:>20}: {len(compress(raw)):,}")

print("\n4. the tied embedding's width (round to nearest, per-row scales; everything else as exported)")
for bits, qmax in (("int8", 127), ("int7", 63), ("int6", 31)):
    trial = dict(quantized)
    trial["tok_emb.weight"] = ("int8", *tg.quantize_rtn(state["tok_emb.weight"].float(), qmax))
    b = tg.serialize(trial)
    print(f"  {bits}: {len(b):,} model bytes, val_bpb {val_bpb(tg.deserialize(b)):.4f}")

print("\n5. grid steps (QUANT_SIGMAS for the int6 matrices, GPTQ; QUANT_EMBED_SIGMAS for the int8 tables, RTN)")
for sigmas, embed_sigmas in ((0, 0), (6, 0), (12.85, 0), (19.3, 0), (0, 20), (12.85, 20)):
    b = tg.serialize(tg.quantize_model(model, hessians, log=lambda m: None, sigmas=sigmas, embed_sigmas=embed_sigmas))
    print(f"  QUANT_SIGMAS={sigmas:<5g} QUANT_EMBED_SIGMAS={embed_sigmas:<3g}: {len(b):,} model bytes "
          f"({len(b) / len(blob) - 1:+.1%}), val_bpb {val_bpb(tg.deserialize(b)) - float_bpb:+.4f} from float")

print("\n6. the tied embedding: round to nearest vs GPTQ on the head's Hessian (the final hidden states)")
head_h = tg.collect_hessians(model, [loader.next_batch(hp.train_seq_len * 16, hp.train_seq_len) for _ in range(4)],
                            ctx, ["tok_emb.weight"])
for embed_sigmas in (0, 20):
    for how, hs in (("round to nearest", {}), ("GPTQ", head_h)):
        b = tg.serialize(tg.quantize_model(model, {**hessians, **hs}, log=lambda m: None, embed_sigmas=embed_sigmas))
        print(f"  QUANT_EMBED_SIGMAS={embed_sigmas:<3g} {how:>16}: {len(b):,} model bytes, "
              f"val_bpb {val_bpb(tg.deserialize(b)) - float_bpb:+.5f} from float")

print("\n7. the artifact as one LZMA stream vs its parts apart (as exported now), and each part by LZMA's best "
      "lc/lp/pb or by Brotli-11")
try:
    import brotli
except ImportError:
    brotli = None


def raw_lzma(b, lc, lp, pb):
    return len(lzma.compress(b, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": lp, "pb": pb}]))


for sigmas in (0, 12.85):
    qd = tg.quantize_model(model, hessians, log=lambda m: None, sigmas=sigmas)
    parts = {"values": b"".join(q.numpy().astype("int8").tobytes() for k, q, s in qd.values() if k != "float"),
             "scales": b"".join(s.numpy().astype("<f2").tobytes() for k, q, s in qd.values() if k != "float"),
             "floats": b"".join(q.numpy().astype("<f2").tobytes() for k, q, s in qd.values() if k == "float")}
    blob_parts = tg.serialize(qd)
    one = len(lzma.compress(raw_bytes(blob_parts), format=lzma.FORMAT_XZ, filters=tg.LZMA_FILTERS))
    line = f"  QUANT_SIGMAS={sigmas:<5g}: one stream {one:,}, as exported (parts apart) {len(blob_parts):,};"
    for name, b in parts.items():
        best = min((raw_lzma(b, lc, lp, pb), f"lc{lc}lp{lp}pb{pb}") for lc in (0, 2, 4) for lp in (0, 1, 2)
                   for pb in (0, 1, 2) if lc + lp <= 4)
        line += f" {name} {len(b):,} -> lzma {best[0]:,} ({best[1]})"
        line += f" brotli {len(brotli.compress(b, quality=11)):,};" if brotli else ";"
    print(line)

print("\n8. LQER: how much of GPTQ's Hessian-weighted error a rank-4 SVD of the error removes (factors unquantized, so an"
      " upper bound), per matrix, and over all int6 matrices when the 3 of largest |E| get it (the records' choice)")
lq = []
for n in names:
    W = state[n].float()
    q, s = tg.quantize_gptq(W, hessians[n], tg.INT6_MAX, sigmas=hp.quant_sigmas)
    E = W - q.float() * s[:, None]
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    before = float(tg.hessian_row_errors(E, hessians[n]).sum())
    after = float(tg.hessian_row_errors(E - (U[:, :4] * S[:4]) @ Vh[:4], hessians[n]).sum())
    lq.append((float(E.norm()), n, before, after, float((S[:4] ** 2).sum() / (S ** 2).sum())))
lq.sort(reverse=True)
for fro, n, before, after, share in lq[:3]:
    print(f"  {n}: rank-4 share of |E|^2 {share:.1%}, Hessian-weighted error {after / before - 1:+.1%}")
print(f"  over all {len(lq)} matrices: {-sum(b - a for _, _, b, a, _ in lq[:3]) / sum(b for _, _, b, _, _ in lq):+.2%}")


print("\n9. at the export's grids (QUANT_SIGMAS, GPTQ): val_bpb with each group of weights alone quantized; the Mamba-2"
      " in_proj by role: error share, bits a value, val_bpb")
qd = tg.quantize_model(model, hessians, log=lambda m: None, sigmas=hp.quant_sigmas, embed_sigmas=hp.quant_embed_sigmas)
deq = tg.deserialize(tg.serialize(qd))
all_bpb = val_bpb(deq)  # float_bpb: section 2's
mixers = {f"blocks.{i}.mixer.in_proj.weight": b.mixer for i, b in enumerate(model.blocks) if model.is_mamba[i]}
m = next(iter(mixers.values()))
gn = m.ngroups * m.d_state
widths = {"z": m.d_inner, "x": m.d_inner, "B": gn, "C": gn, "dt": m.nheads}
rows, start = {}, 0
for role, w in widths.items():
    rows[role], start = slice(start, start + w), start + w


def with_rows(base, source, role):
    """base's weights with the in_proj rows of this role (every Mamba block) taken from source."""
    out = dict(base)
    for n in mixers:
        out[n] = base[n].clone()
        out[n][rows[role]] = source[n][rows[role]]
    return out


print(f"  {len(mixers)} Mamba-2 blocks; float val_bpb {float_bpb:.4f}, whole model quantized {all_bpb - float_bpb:+.5f}")
groups = {"Mamba-2 in_proj": lambda n: ".mixer.in_proj." in n, "Mamba-2 out_proj": lambda n: ".mixer.out_proj." in n,
          "attention": lambda n: any(f".mixer.{w}." in n for w in ("q", "k", "v", "proj")),
          "MLP": lambda n: ".mlp." in n, "embeddings": lambda n: "emb" in n}
for group, member in groups.items():  # which weights the quantization error comes from: each group alone quantized
    own = [n for n, (k, _, _) in qd.items() if k != "float" and member(n)]
    if own:
        part = val_bpb({**state, **{n: deq[n] for n in own}}) - float_bpb
        print(f"  only the {group} quantized ({len(own)} tensors, {sum(state[n].numel() for n in own):,} values): {part:+.5f}")
errs = {n: tg.hessian_row_errors(state[n].float() - deq[n], hessians[n]) for n in mixers}
total = sum(float(e.sum()) for e in errs.values())
for role, r in rows.items():
    share = sum(float(e[r].sum()) for e in errs.values()) / total
    values = torch.cat([qd[n][1][r].flatten() for n in mixers])
    bits = 8 * tg.entropy_bytes(values) / values.numel()
    only = val_bpb(with_rows(state, deq, role)) - float_bpb
    kept = val_bpb(with_rows(deq, state, role)) - float_bpb
    print(f"  {role:>2}: {r.stop - r.start:4d} rows a block, {share:6.1%} of in_proj's error (rows {(r.stop - r.start) / start:5.1%}), "
          f"{bits:.2f} bits a value; only it quantized {only:+.5f}, it kept float {kept:+.5f}")

print("\n10. a cap a little under the artifact, at the export's grids: lower whole matrices' bit widths (what the export"
      " does) or widen every int6 matrix's grid step (QUANT_SIGMAS times f, the smallest f that fits, by bisection)")
quiet = lambda m: None  # noqa: E731
b0 = tg.serialize(qd)
print(f"  {len(b0):,} model bytes at QUANT_SIGMAS={hp.quant_sigmas:g}: val_bpb {all_bpb:.4f} (float {float_bpb:.4f})")
for frac in (0.0025, 0.005, 0.01, 0.02):
    limit = int(len(b0) * (1 - frac))
    lowered = tg.fit_to_cap(qd, model, hessians, limit, log=quiet, sigmas=hp.quant_sigmas)
    lo, hi = 1.0, 1.0 + 20 * frac
    for _ in range(7):
        mid = (lo + hi) / 2
        fits = len(tg.serialize(tg.quantize_model(model, hessians, log=quiet, sigmas=hp.quant_sigmas * mid,
                                                  embed_sigmas=hp.quant_embed_sigmas))) <= limit
        lo, hi = (lo, mid) if fits else (mid, hi)
    widened = tg.serialize(tg.quantize_model(model, hessians, log=quiet, sigmas=hp.quant_sigmas * hi,
                                             embed_sigmas=hp.quant_embed_sigmas))
    by_bits, by_step = (val_bpb(tg.deserialize(b)) for b in (lowered, widened))
    print(f"  {frac:.2%} under ({limit:,}): lowered {len(lowered):,} B val_bpb {by_bits:.4f} ({by_bits - all_bpb:+.5f})"
          f" | widened x{hi:.4f} {len(widened):,} B val_bpb {by_step:.4f} ({by_step - all_bpb:+.5f})")
