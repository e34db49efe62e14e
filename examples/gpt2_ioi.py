"""IOI on GPT-2 small with edge AtP*: for users who have `gpt2` in their Hugging Face cache.

    python examples/gpt2_ioi.py [--n-pairs 32] [--out gpt2-ioi]

edgeatp never downloads on its own; with no cached gpt2 this stops with one line telling you so
(pass --allow-download on a networked machine to fetch it once).
"""

import argparse
import sys

import edgeatp as ea
from edgeatp.config import DiscoverConfig
from edgeatp.pipeline import run_discover
from edgeatp.progress import for_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-pairs", type=int, default=32)
    parser.add_argument("--out", default="gpt2-ioi")
    parser.add_argument("--allow-download", action="store_true")
    args = parser.parse_args()
    try:
        result = run_discover(DiscoverConfig(model="gpt2", task="ioi", n_pairs=args.n_pairs, method="atp*",
                                             batch_size=8, allow_download=args.allow_download),
                              progress=for_stream(sys.stderr), log=print)
    except ea.EdgeatpError as exc:
        raise SystemExit(f"error: {exc}")
    print(result.describe())
    written = ea.write_outputs(result.circuit, args.out, ["json", "svg", "md"], scores=result.scores)
    for fmt, path in written.paths.items():
        print(f"wrote {fmt}: {path}")


if __name__ == "__main__":
    main()
