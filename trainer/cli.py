"""What every entry script shares: `--help` listing the config tree, user errors as one line on stderr
with exit code 2 (a traceback only for a bug, or for every error with `--debug`), and DeepSpeed's op
cache inside the repository.

Why one module: the scripts each did this their own way (one printed config errors, one a traceback,
one crashed on `--help`); a user should meet the same contract from every command.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from data_pipeline.errors import DataError
from trainer.checkpoint import CheckpointError
from trainer.config import REPO_ROOT, ConfigError, config_help
from trainer.engine import NonFiniteError

# A plain `deepspeed trainer/pretrain.py ...` would otherwise JIT-build DeepSpeed's CPU op into
# ~/.cache (~55 s) instead of reusing the one scripts/setup.sh built. Read when the op is first loaded.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))

DEBUG = "--debug"
DEBUG_EPILOG = (f"{DEBUG}: show the traceback of every error (otherwise an input or config error prints one "
                "line and exits with code 2)")
# Errors about what the user gave us; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)
OUR_PACKAGES = ("trainer", "models", "data_pipeline")
DIVERGED = 3  # exit code of a run stopped by train.on_nonfinite: not the input's fault, nor a bug


def show_help(argv: Sequence[str], doc: str, *configs: type) -> bool:
    """Print the script's docstring, the flags and every key of each config tree if argv asks for help;
    True when it did (the caller returns before initialising anything)."""
    if not {"-h", "--help"} & set(argv):
        return False
    print(doc.strip(), "", "-h, --help: this list", DEBUG_EPILOG, sep="\n")
    for cls in configs:
        print(f"\n{cls.__name__} keys (`--config FILE` sets them, then `key=value` overrides; "
              f"defaults as this command sets them):")
        print(config_help(cls))
    return True


def run(main: Callable[[list[str]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Call main(argv without `--debug`) and return the exit code: main's own int result, else 0; 2
    after a user error, 3 after a non-finite loss stopped training, either printed as one line; 1 after
    any other error, with its traceback (as an uncaught one), and after every error with `--debug`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG in argv
    try:
        code = main([a for a in argv if a != DEBUG])
    except Exception as e:
        diverged = isinstance(e, NonFiniteError)
        if debug or not (diverged or is_user_error(e)):
            traceback.print_exc()  # as the interpreter would; the entry point still ends its process group
            return 1
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr, flush=True)
        return DIVERGED if diverged else 2
    return code if isinstance(code, int) else 0


def is_user_error(e: BaseException) -> bool:
    """A typed input/config error, or a ValueError raised by this project's own checks (the innermost
    frame is ours): a library's ValueError deep inside a call is more likely a bug of ours."""
    if isinstance(e, USER_ERRORS):
        return True
    if type(e) is not ValueError or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(REPO_ROOT) and path.relative_to(REPO_ROOT).parts[0] in OUR_PACKAGES
