"""Start ``kdcache ARGS`` after a delay, logging to a file of its own: a process of the many-writers trials.

    python tests/start_rank.py LOG_DIR DELAYS ARGS...

DELAYS is a comma-separated list of seconds indexed by the torchrun rank (RANK, 0 without
torchrun). The process writes its pid to LOG_DIR/NAME.pid and its output to LOG_DIR/NAME.log,
NAME being ``rank-R`` (or LOG_DIR's own name for a single job), so a trial can kill it and
count what it did.
"""

import os
import sys
import time
from pathlib import Path

log_dir, delays, args = Path(sys.argv[1]), [float(d) for d in sys.argv[2].split(",")], sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
name = f"rank-{rank}"
(log_dir / f"{name}.pid").write_text(str(os.getpid()))
log = os.open(log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(log, 1)
os.dup2(log, 2)
time.sleep(delays[rank % len(delays)])

from kdcache_cli.main import app  # noqa: E402

sys.argv = ["kdcache", *args]
app()
