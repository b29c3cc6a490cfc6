"""Command-line interface: ``python -m medgemma_lib <command> ...`` (also installed as ``medgemma``).

Each step module registers its own sub-command through ``register_cli(subparsers)`` and sets
``func`` on its parser; the function receives the parsed arguments and returns an exit code.
Modules import torch and transformers inside their functions, so ``--help`` stays fast.

User errors (:class:`~medgemma_lib.errors.MedgemmaError`) are printed in Traditional Chinese and
give exit code 2 with no traceback, unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from medgemma_lib.errors import EXIT_USER_ERROR, MedgemmaError

# Order here is the order in ``--help``.
COMMAND_MODULES = [
    "medgemma_lib.env",
    "medgemma_lib.config",
    "medgemma_lib.auth",
    "medgemma_lib.data",
    "medgemma_lib.models",
    "medgemma_lib.memory",
    "medgemma_lib.train",
    "medgemma_lib.demo",
    "medgemma_lib.evaluate",
    "medgemma_lib.chat",
    "medgemma_lib.export",
    "medgemma_lib.bench",
]


class ChineseArgumentParser(argparse.ArgumentParser):
    """argparse with Traditional Chinese usage errors (still exit code 2)."""

    def error(self, message: str) -> None:  # pragma: no cover - exercised through subprocess tests
        self.print_usage(sys.stderr)
        sys.stderr.write(f"參數錯誤：{message}\n請執行 `{self.prog} --help` 查看用法。\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = ChineseArgumentParser(
        prog="python -m medgemma_lib",
        description="MedGemma QLoRA 微調課程的命令列工具（與 notebooks 使用同一套函式）。",
    )
    parser.add_argument("--debug", action="store_true", help="發生錯誤時顯示完整的 Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="指令", parser_class=ChineseArgumentParser)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else EXIT_USER_ERROR
    debug = args.debug or os.environ.get("MEDGEMMA_DEBUG") == "1"
    try:
        code = args.func(args)
    except MedgemmaError as err:
        if debug:
            raise
        sys.stderr.write(f"{err.label}：{err.format()}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\n已中斷（Ctrl+C）。\n")
        return 130
    return int(code or 0)
