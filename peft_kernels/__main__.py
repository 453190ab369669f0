"""Command line: ``python -m peft_kernels demo [options]`` (also installed as ``peft-kernels``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from peft_kernels import demo

    demo.add_arguments(sub.add_parser("demo", help="serve a mixed batch of LoRA/LoHa/LoKr requests; compare with PEFT"))
    sub.add_parser("info", help="print the backends available here")
    args = parser.parse_args(argv)
    if args.command == "info":
        import peft_kernels

        print(peft_kernels.backend_info())
        return 0
    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
