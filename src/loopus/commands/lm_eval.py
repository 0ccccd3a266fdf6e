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
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness's CLI with the loopus model and offline tasks (all lm_eval flags work)",
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("--data", default=None, help="data directory for the offline tasks (default: $LOOPUS_DATA)")
    p.add_argument("--hub-tasks", action="store_true", help="use lm-eval's hub tasks instead of the offline ones")
    p.set_defaults(handler=run, accepts_extra=True)


def lm_eval_argv(extra: list[str], offline_tasks: bool = True) -> list[str]:
    """The lm_eval argument list: `extra` plus `--include_path` of the shipped tasks unless one is given."""
    from ..eval import TASKS_DIR

    argv = list(extra)
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if offline_tasks and not given:
        argv += ["--include_path", str(TASKS_DIR)]
    elif offline_tasks and given:
        print("loopus lm-eval: --include_path given: loopus's offline tasks are not added", file=sys.stderr)
    return argv


def run(args: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    from ..eval import quiet_task_logs

    if args.data is not None:
        from ..paths import data_dir

        os.environ["LOOPUS_DATA"] = str(data_dir(args.data).resolve())

    extra = list(getattr(args, "extra", []) or [])
    offline = not args.hub_tasks and bool(os.environ.get("LOOPUS_DATA"))
    if not extra or extra[0] in ("-h", "--help"):
        print(__doc__)
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(extra, offline)]
    try:
        quiet_task_logs()
        cli_evaluate()
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
