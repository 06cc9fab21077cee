"""`python -m radixserve.generate "question"`: one chat answer from the offline Engine.

With no --model-path this runs the default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import sys

from radixserve.engine import Engine
from radixserve.server_args import ServerArgs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--raw", action="store_true", help="no chat template")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    with Engine(**vars(server_args) | {"extra": {}}) as engine:
        if args.raw:
            out = engine.generate(args.prompt, sampling)
        else:
            out = engine.chat([{"role": "user", "content": args.prompt}], sampling)
    print(out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
