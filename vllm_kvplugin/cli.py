# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin`` command line. Runs in the user's shell process."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-kvplugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="serve a locally generated model with the connector; show KV reuse")
    demo.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    demo.add_argument("--prompt-tokens", type=int, default=3000)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from vllm_kvplugin.demo import main_job

        return main_job.run(args.workdir, args.prompt_tokens)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
