"""Test backends and test hosts for the tests, the demo and the benchmarks.

* `behaviour` — what a backend does per request (latency distributions,
  error ratio, refusing, closing mid-request, pacing, body size); pure.
* `server` — one asyncio process serving many HTTP/1.1 backends, changed at
  run time over a unix control socket (`python -m equilibriumd.lab.testbed.server`).
* `control` — `TestBackends`, the Python handle that starts and steers it.
* `hosts` — network-namespace hosts behind a veth pair with a real tbf
  bandwidth limit (root only).

Nothing here is imported by the agent.
"""

from equilibriumd.lab.testbed.behaviour import Behaviour, Latency
from equilibriumd.lab.testbed.control import TestBackends, TestBackendsError
from equilibriumd.lab.testbed.hosts import TestHost, mbit, netns_host, netns_hosts

__all__ = ["Behaviour", "Latency", "TestBackends", "TestBackendsError", "TestHost", "mbit", "netns_host",
           "netns_hosts"]
