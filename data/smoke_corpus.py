"""SMOKE's corpus: a synthetic language with known structure, its own BPE tokenizer, and train/val shards
in the challenge's format. train_gpt.py loads this file for SMOKE=1 (a submission never needs it).

Words are made of syllables; sentences follow a sparse first-order Markov chain over words (each word has
four likely successors), so a model that learns the transitions beats the unigram rate by a wide margin.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_format import write_shard  # noqa: E402


def make_smoke_corpus(root, vocab_size, seed=0):
    """Writes smoke.model and fineweb_{train,val}_000000.bin under root; returns (data path, tokenizer path)."""
    import sentencepiece as spm
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "ne", "su", "mo", "la", "pi", "de", "fu", "go", "ya", "zo", "chi", "wa", "be"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    successors = {w: rng.sample(words, 4) for w in words}

    def doc():
        out, w = [], rng.choice(words)
        for _ in range(rng.randint(40, 120)):
            out.append(w)
            w = rng.choice(successors[w]) if rng.random() < 0.9 else rng.choice(words)
        return " ".join(out).capitalize() + "."
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = [doc() for _ in range(3000)], [doc() for _ in range(150)]
    (root / "spm_train.txt").write_text("\n".join(train_docs[:1500]))
    spm.SentencePieceTrainer.train(input=str(root / "spm_train.txt"), model_prefix=str(root / "smoke"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2, num_threads=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "smoke.model"))
    for split, docs in (("train", train_docs), ("val", val_docs)):
        write_shard(root / f"fineweb_{split}_000000.bin",
                    np.concatenate([np.array([sp.bos_id()] + sp.encode(d), dtype=np.uint16) for d in docs]))
    return str(root), str(root / "smoke.model")
