"""The container's health check: exit 0 when the bridge's ``/ready`` answers 200, else 1.

Standard library only (the image has no curl). It asks the admin API on the loopback at
``DSF_BRIDGE_API__PORT`` (default 8480); the image turns the API on and listens on all
addresses. A 503 prints the failing checks, which ``docker inspect`` shows under ``Health``.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT = 8.0


def main() -> int:
    port = os.environ.get("DSF_BRIDGE_API__PORT", "8480")
    url = f"http://127.0.0.1:{port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            if response.status == 200:
                return 0
            print(f"{url}: {response.status}")
            return 1
    except urllib.error.HTTPError as exc:
        try:
            checks = json.loads(exc.read()).get("checks", [])
            failing = [f"{c['name']}: {c['detail']}" for c in checks if not c.get("ok")]
        except (ValueError, AttributeError, KeyError, TypeError):
            failing = []
        print(f"{url}: {exc.code} " + "; ".join(failing))
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"{url}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
