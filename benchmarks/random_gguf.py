"""A llama-architecture GGUF file of a preset's shape (kiln.checkpoint.random.PRESETS) with
random blocks of one llama.cpp type, for timing GGUF engines kept quantized at real shapes
without a download (speed does not depend on weight values):

    python benchmarks/random_gguf.py /tmp/llama8b-q4_1.gguf --config llama-3.1-8b --type Q4_1
    kiln bench latency /tmp/llama8b-q4_1.gguf --input-len 128 --output-len 256

Every linear of the decoder layers is in --type; the embedding in --embed and the output
layer in --head (Q8_0 both by default, as SmolLM2's file has its tied embedding; "tied":
no output.weight). Each block's fp16 fields (scale, minimum) are random finite values of
about 0.01, the rest random bytes (kiln.checkpoint.random_gguf)."""

from __future__ import annotations

import argparse
import sys

from kiln.checkpoint.random_gguf import write_random_gguf
from kiln.errors import CheckpointError


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--type", default="Q4_1", help="the decoder layers' llama.cpp type")
    ap.add_argument("--embed", default="Q8_0")
    ap.add_argument("--head", default="Q8_0", help='a llama.cpp type, or "tied"')
    args = ap.parse_args(argv)
    try:
        write_random_gguf(args.out, args.config, args.type, args.embed, args.head)
    except CheckpointError as e:
        sys.exit(f"random_gguf: {e}")


if __name__ == "__main__":
    main()
