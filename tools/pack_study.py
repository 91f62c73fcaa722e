#!/usr/bin/env python3
"""How small train_gpt.py packs, several ways (docs/packing.md quotes the output; CPU, about a minute):

    python3 tools/pack_study.py [train_gpt.py]

Each way of preparing the source (as it is, comments removed, ast.unparse, ast.unparse less docstrings) is
compressed with the best raw-LZMA2 settings of a small search and base85-encoded; then, on the last one,
the LZMA settings and containers one by one, and other compressors; last, what packed_source() gives.
"""
import ast, base64, bz2, io, lzma, sys, tokenize, zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def raw(data, **options):
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[dict(
        id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME, **options)])


def best_raw(data, nice=(64, 128, 273), mfs=(lzma.MF_BT4,)):
    return min((len(raw(data, lc=lc, lp=lp, pb=pb, nice_len=n, mf=mf)), f"lc={lc} lp={lp} pb={pb} nice_len={n} mf={mf}")
               for lc in range(5) for lp in range(3) if lc + lp <= 4 for pb in range(3) for n in nice for mf in mfs)


def without_docstrings(tree):
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def main(argv=None):
    path = Path((argv or sys.argv[1:] or [str(Path(__file__).resolve().parents[1] / "train_gpt.py")])[0])
    source = path.read_bytes()
    ways = {
        "as it is": source,
        "comments removed (tokenize)": tokenize.untokenize(
            t for t in tokenize.tokenize(io.BytesIO(source).readline) if t.type != tokenize.COMMENT),
        "ast.unparse": ast.unparse(ast.parse(source)).encode(),
        "ast.unparse, docstrings removed": ast.unparse(without_docstrings(ast.parse(source))).encode(),
    }
    print(f"{path}: {len(source):,} bytes")
    print("| what is compressed | bytes | LZMA (best raw settings) | + base85 | of the readable bytes |")
    print("| --- | --- | --- | --- | --- |")
    for name, data in ways.items():
        size, _ = best_raw(data)
        b85 = -(-size // 4) * 5
        print(f"| {name} | {len(data):,} | {size:,} | {b85:,} | {100 * b85 / len(source):.1f}% |")
    text = ways["ast.unparse, docstrings removed"]
    print("\non 'ast.unparse, docstrings removed':")
    print(f"  raw LZMA2 9e default {len(raw(text)):,}; preset 6 "
          f"{len(lzma.compress(text, format=lzma.FORMAT_RAW, filters=[{'id': lzma.FILTER_LZMA2}])):,}")
    size, how = best_raw(text, nice=(32, 48, 64, 96, 128, 192, 273),
                         mfs=(lzma.MF_BT2, lzma.MF_BT3, lzma.MF_BT4, lzma.MF_HC3, lzma.MF_HC4))
    print(f"  raw LZMA2 best of the search: {size:,} ({how}; mf ids: hc3 3, hc4 4, bt2 18, bt3 19, bt4 20)")
    print(f"  raw LZMA2 lc=3 lp=0 pb=0 nice_len=64 bt4: {len(raw(text, lc=3, lp=0, pb=0, nice_len=64)):,}")
    print(f"  .xz 9e {len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)):,}; .lzma (LZMA1) lc=3 lp=0 pb=0 "
          f"nice_len=64: {len(lzma.compress(text, format=lzma.FORMAT_ALONE, filters=[dict(id=lzma.FILTER_LZMA1, preset=9 | lzma.PRESET_EXTREME, lc=3, lp=0, pb=0, nice_len=64)])):,}")
    print(f"  bz2-9 {len(bz2.compress(text, 9)):,}; zlib-9 {len(zlib.compress(text, 9)):,}", end="")
    try:
        import brotli
        print(f"; brotli-11 {len(brotli.compress(text, quality=11)):,}")
    except ImportError:
        print("; brotli not installed")
    import train_gpt
    packed = train_gpt.packed_source(source)
    print(f"\npacked_source(): {len(packed):,} bytes, {100 * len(packed) / len(source):.1f}% of {len(source):,}")


if __name__ == "__main__":
    main()
