"""`python -m grpo.api.runner ARGS...`: `grpo ARGS...` (the server runs `train` this way) that dies with
the server which started it.

The trainer runs in its own session (so a cancel can kill its whole process group), which also means a
killed server would not take it along. A watcher thread here notices when the server (`GRPO_SERVER_PID`,
else the parent at start) is gone and SIGKILLs this process group; the reward workers, each in its own
group, follow within a second (they watch their parent, the trainer). A restarted server then resumes the
job from its last checkpoint without an old trainer still writing into the run directory.
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
    from grpo.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
