#!/usr/bin/env python3
"""Container health: the service answers on its Prometheus endpoint (`FEDMQ_METRICS_PORT`).

Exit 0 when `GET /metrics` returns 200 within the timeout, 1 otherwise. Every fedmq service
starts its metrics endpoint once its settings loaded and its model is built, so a process
that crashed or never started reads as unhealthy. Without a metrics port (a one-shot
command such as `fedmq report`) there is nothing to probe and the check passes.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 3.0
"""Below the HEALTHCHECK timeout (5 s) so a slow answer reads as a failure, not a hang."""


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
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
