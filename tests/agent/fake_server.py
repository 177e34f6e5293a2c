"""A stand-in for ``corolla server`` used by the agent tests.

Accepts the real server's command line (unknown flags are ignored), writes the JSON status file
like the real server, and exits on SIGTERM. ``--fake-mode`` changes its behaviour:
``crash`` exits with code 3 at once; ``ignore-term`` ignores SIGTERM; ``grandchild`` also
starts a sleeping grandchild (to check that stopping leaves nothing behind), whose pid it writes
to ``<status-file>.grandchild``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

logger = logging.getLogger("fake_server")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="fake-server: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--status-file", type=Path)
    parser.add_argument("--fake-mode", default="normal")
    args, rest = parser.parse_known_args()
    logger.info("model %s, %d blocks, other args %s", args.model, args.num_blocks, rest)
    if args.fake_mode == "crash":
        logger.error("simulated crash: CUDA out of memory")
        return 3
    stop = threading.Event()
    if args.fake_mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.fake_mode == "grandchild" and args.status_file:
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        Path(f"{args.status_file}.grandchild").write_text(str(child.pid))
    tokens = 0
    while not stop.wait(0.1):
        tokens += 7
        if args.status_file:
            tmp = args.status_file.with_suffix(".tmp")
            status = {"blocks": f"0:{args.num_blocks}", "tokens_processed": tokens, "state": "online"}
            tmp.write_text(json.dumps(status))
            os.replace(tmp, args.status_file)
    logger.info("SIGTERM: leaving the swarm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
