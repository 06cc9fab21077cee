"""`python -m radixserve.launch_server` and the `radixserve` console script."""

from __future__ import annotations

import argparse
import sys

from radixserve.server_args import ServerArgs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="radixserve", description="Serve an LLM over an OpenAI-compatible HTTP API.")
    ServerArgs.add_cli_args(parser)
    server_args = ServerArgs.from_cli_args(parser.parse_args(argv), parser=parser)
    # Imported after parsing so that --help stays fast.
    from radixserve.entrypoints.http_server import launch_server

    try:
        return launch_server(server_args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
