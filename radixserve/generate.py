"""`python -m radixserve.generate "question"`: one chat answer from the offline Engine.

With no --model-path this runs the default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import sys

from radixserve.engine import Engine
from radixserve.server_args import ServerArgs, non_negative_int


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="radixserve.generate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?",
                        help="the question (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=non_negative_int, default=64,
                        help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--raw", action="store_true",
                        help="send the prompt as is, without the chat template "
                             "(default: %(default)s)")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args, parser=parser)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    with Engine(**vars(server_args)) as engine:
        if args.raw:
            out = engine.generate(args.prompt, sampling)
        else:
            out = engine.chat([{"role": "user", "content": args.prompt}], sampling)
    print(out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
