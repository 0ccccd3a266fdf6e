"""`loopus lm-eval ...`: lm-evaluation-harness's own command line, with the `loopus` model registered
and the offline tasks shipped with loopus on the task path. Every lm_eval flag works:

    loopus lm-eval --model loopus --model_args pretrained=DIR,num_loops=8 --tasks arc_easy,piqa
    loopus lm-eval --model hf --model_args pretrained=BASE_DIR --tasks wikitext --limit 10

Options of loopus itself (everything else goes to lm_eval unchanged):
    --data DIR           the data directory for the offline tasks (default: $LOOPUS_DATA)
    --hub-tasks          don't put loopus's offline tasks on the path (use lm-eval's hub datasets)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..paths import DATA_ENV

HELP = "run lm-evaluation-harness's CLI with the loopus model and offline tasks (all lm_eval flags work)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-eval",
        help=HELP,
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("--data", default=None, help="data directory for the offline tasks (default: $LOOPUS_DATA)")
    p.add_argument("--hub-tasks", action="store_true", help="use lm-eval's hub tasks instead of the offline ones")
    p.set_defaults(handler=run, accepts_extra=True)


def lm_eval_argv(extra: list[str], data: str | None = None) -> list[str]:
    """The lm_eval argument list: `extra`, and with a data directory `data` the shipped offline tasks
    (`--include_path`, unless one is given) with that directory as their task metadata."""
    from ..eval import TASKS_DIR

    argv = list(extra)
    if data is None:
        return argv
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if not given:
        argv += ["--include_path", str(TASKS_DIR), "--metadata", json.dumps({"data_dir": data})]
    else:
        print("loopus lm-eval: --include_path given: loopus's offline tasks are not added", file=sys.stderr)
    return argv


def run(args: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    from ..eval import quiet_task_logs
    from ..paths import data_dir

    extra = list(getattr(args, "extra", []) or [])
    offline = not args.hub_tasks and (args.data is not None or bool(os.environ.get(DATA_ENV)))
    data = str(data_dir(args.data).resolve()) if offline else None
    if not extra or extra[0] in ("-h", "--help"):
        print(__doc__)
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(extra, data)]
    try:
        quiet_task_logs()
        cli_evaluate()
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
