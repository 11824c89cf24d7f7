"""`python -m grpo.api.runner ARGS...`: `grpo ARGS...` (the server runs `train` this way) that dies with
the server which started it.

The trainer runs in its own session (so a cancel can kill its whole process group), which also means a
killed server would not take it along. A watcher thread here notices when the server (`GRPO_SERVER_PID`,
else the parent at start) is gone and SIGKILLs this process group; the reward workers, each in its own
group, follow within a second (they watch their parent, the trainer). A restarted server then resumes the
job from its last checkpoint without an old trainer still writing into the run directory.

`python -m grpo.api.runner launch ACCELERATE_ARGS... -m grpo.api.runner train ...` (a job with several
processes, grpo.api.devices): this process, the job's group leader, watches the server and runs `accelerate
launch` in itself; each rank (a `runner train` in a session of its own, as torch's launcher starts them)
watches this leader the same way, so a dead server or a killed leader takes every rank down.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def _watch(server_pid: int, interval_s: float = 0.2) -> None:
    while True:
        if os.getppid() != server_pid:
            if os.getpgrp() == os.getpid():  # we lead our group (start_new_session): take it all down
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(137)
        time.sleep(interval_s)


def main(argv: list[str]) -> int:
    server_pid = int(os.environ.get("GRPO_SERVER_PID") or os.getppid())
    threading.Thread(target=_watch, args=(server_pid,), name="server-watch", daemon=True).start()
    if argv[:1] == ["launch"]:
        return _launch(argv[1:])
    from grpo.cli import main as cli_main

    return cli_main(argv)


def _launch(args: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    os.environ["GRPO_SERVER_PID"] = str(os.getpid())  # the ranks watch this leader, their parent
    try:
        launch_command(launch_command_parser().parse_args(args))
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - a rank failed: torch's launcher says which above; the job fails
        print(f"accelerate launch failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
