#!/usr/bin/env python3
"""Container health: the service answers on its Prometheus endpoint (`FEDMQ_METRICS_PORT`).

Exit 0 when `GET /metrics` returns 200 within the timeout, 1 otherwise. Every fedmq service
starts its metrics endpoint once its settings loaded and its model is built, so a process
that crashed or never started reads as unhealthy. The endpoint is served by a side thread,
so a service whose main loop reports its last round (`fedmq_main_loop_last_tick_seconds`,
the aggregator) is also unhealthy when that round is older than `STUCK_AFTER_S`. Without a
metrics port (a one-shot command such as `fedmq report`) there is nothing to probe and the
check passes.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.request

TIMEOUT_S = 3.0
"""Below the HEALTHCHECK timeout (5 s) so a slow answer reads as a failure, not a hang."""
STUCK_AFTER_S = 120.0
"""A main loop goes round at least every second; two minutes without one is a hang."""
_TICK = re.compile(r"^fedmq_main_loop_last_tick_seconds(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


def main() -> int:
    """Probe `http://127.0.0.1:$FEDMQ_METRICS_PORT/metrics`; 0 is healthy."""
    port = os.environ.get("FEDMQ_METRICS_PORT", "").strip()
    if not port or port == "0":
        print("no fixed FEDMQ_METRICS_PORT: nothing to probe")
        return 0
    url = f"http://127.0.0.1:{int(port)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            healthy = response.status == 200
            text = response.read().decode(errors="replace")
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    return 0 if healthy and not _stuck(text, time.time()) else 1


def _stuck(metrics: str, now: float) -> bool:
    """Whether the main loop's last round is older than `STUCK_AFTER_S` (0: not started)."""
    match = _TICK.search(metrics)
    if match is None:
        return False
    last = float(match.group(1))
    if last > 0 and now - last > STUCK_AFTER_S:
        print(f"main loop stuck: last round {now - last:.0f} s ago", file=sys.stderr)
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
