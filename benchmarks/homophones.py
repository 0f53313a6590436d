"""How many of an adapter's character substitutions are homophones (same pinyin, tones ignored)?

    pip install pypinyin   # analysis only; not a loratune dependency
    python benchmarks/homophones.py outputs/acc/tempo_default/eval/predictions_adapter.csv

Reads a ``predictions_*.csv`` of ``loratune evaluate`` (normalised reference and hypothesis columns),
aligns each pair at the character level with jiwer (as loratune's CER does) and counts substituted
characters whose toneless pinyin equals the reference's. A high share means the acoustics were heard
right and the written character was chosen wrong: the case for rescoring with a language model.
"""
from __future__ import annotations

import csv
import sys


def main(path: str) -> None:
    import jiwer
    from pypinyin import lazy_pinyin

    subs = same = deletions = insertions = chars = 0
    for row in csv.DictReader(open(path, encoding="utf-8")):
        ref = "".join(row["reference_norm"].split())
        hyp = "".join(row["hypothesis_norm"].split())
        chars += len(ref)
        if not ref or not hyp:
            deletions, insertions = deletions + len(ref), insertions + len(hyp)
            continue
        out = jiwer.process_words(" ".join(ref), " ".join(hyp))
        for chunk in out.alignments[0]:
            if chunk.type == "substitute":
                for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
                    r, h = ref[chunk.ref_start_idx + k], hyp[chunk.hyp_start_idx + k]
                    subs += 1
                    same += lazy_pinyin(r) == lazy_pinyin(h)
            elif chunk.type == "delete":
                deletions += chunk.ref_end_idx - chunk.ref_start_idx
            elif chunk.type == "insert":
                insertions += chunk.hyp_end_idx - chunk.hyp_start_idx
    print(f"{path}: {chars} reference characters; substitutions {subs} (same pinyin, tones ignored: {same}, "
          f"{same / max(subs, 1):.0%}), deletions {deletions}, insertions {insertions}; "
          f"CER {(subs + deletions + insertions) / chars:.4f}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
