"""The `kt-sft` console script: imports the application under a KeyboardInterrupt guard.

Importing kt_sft_train loads torch, transformers and PEFT (seconds); a Ctrl-C in that time would
otherwise print a traceback of the import machinery. This package imports nothing heavy itself.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from kt_sft_train.app.cli import main as cli_main
    except KeyboardInterrupt:
        print("kt-sft: interrupted while starting (nothing was written)", file=sys.stderr)
        return 130
    return cli_main()
