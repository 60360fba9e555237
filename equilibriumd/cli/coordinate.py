"""`equilibriumd coordinate`: the cross-node coordinator (no root, no BPF)."""

from __future__ import annotations

import os
import signal
import socket
from types import FrameType
from typing import Any

import click

from .. import logs

DEFAULT_METRICS = "127.0.0.1:9501"


def _check_addr(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ..metrics import parse_addr

    try:
        parse_addr(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command(help="Run the cross-node coordinator in the foreground: while it leads, every --interval it "
                    "reads the nodes' summaries, solves a correlated equilibrium per shared service and writes "
                    "each node its recommendations (they expire after --ttl). Several replicas may run: one "
                    "leads (a Lease with --kubernetes, a flock with --dir), the others wait. SIGTERM exits and "
                    "gives up the lead at once.")
@click.option("--kubernetes", is_flag=True, help="channel: ConfigMaps in --namespace; election: a Lease")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="channel: files in this directory, shared with agents run with --coordinator dir:PATH; "
                   "election: a flock in it (one machine, no cluster)")
@click.option("--namespace", envvar="POD_NAMESPACE", default="equilibrium", show_default=True,
              help="with --kubernetes: the agents' namespace  [env: POD_NAMESPACE]")
@click.option("--identity", envvar="POD_NAME", default=None,
              help="this replica's name in the election  [env: POD_NAME; default: hostname-pid]")
@click.option("--interval", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help="seconds between rounds")
@click.option("--ttl", default=None, type=click.FloatRange(0.2, 86400), metavar="SECONDS",
              help="a recommendation's lifetime: agents stop following it after  [default: 3 x --interval]")
@click.option("--stale-after", default=None, type=click.FloatRange(0.2, 86400), metavar="SECONDS",
              help="a summary unchanged this long is ignored  [default: max(30, 3 x --interval)]")
@click.option("--max-services", default=256, show_default=True, type=click.IntRange(1, 100000), metavar="N",
              help="services solved per round, the most loaded (one small LP each); the others learn alone")
@click.option("--metrics-addr", default=DEFAULT_METRICS, show_default=True, callback=_check_addr,
              help="serve Prometheus /metrics on HOST:PORT; \"\" or \"off\" disables")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def coordinate(kubernetes: bool, directory: str | None, namespace: str, identity: str | None, interval: float,
               ttl: float | None, stale_after: float | None, max_services: int, metrics_addr: str,
               log_level: str) -> None:
    if kubernetes == bool(directory):
        raise click.UsageError("pick one channel: --kubernetes or --dir PATH")
    logs.setup(log_level)
    log = logs.get("coordinator")
    identity = identity or "%s-%d" % (socket.gethostname(), os.getpid())
    channel: Any
    elector: Any
    try:
        if directory:
            from ..discovery.localchannel import DirChannel, FlockElector

            channel = DirChannel(directory, min_interval=interval / 2, max_bytes=1024 * 1024)
            elector = FlockElector(directory, identity)
        else:
            from ..discovery.channel import Channel
            from ..discovery.client import api_client_from_env
            from ..discovery.lease import DEFAULT_LEASE_NAME, LeaseElector

            api = api_client_from_env()
            channel = Channel(api, namespace, min_interval=interval / 2, max_bytes=512 * 1024)
            elector = LeaseElector(api, namespace, DEFAULT_LEASE_NAME, identity)
    except (OSError, ValueError) as e:
        raise click.ClickException("cannot open the channel: %s" % e) from None
    from ..coordinator.process import Coordinator

    coord = Coordinator(channel, elector, interval=interval, ttl=ttl if ttl is not None else 3 * interval,
                        stale_after=stale_after, max_services=max_services)
    server = None
    if metrics_addr.strip().lower() not in ("", "off"):
        from ..coordinator.metrics import make_registry
        from ..metrics import serve_registry

        try:
            server = serve_registry(make_registry(coord), metrics_addr)
        except OSError as e:
            raise click.ClickException(str(e)) from None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        coord.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("coordinator_starting", identity=identity, channel=directory or "configmaps in %s" % namespace,
             interval_seconds=interval, ttl_seconds=coord.ttl, stale_after_seconds=coord.stale_after,
             metrics=metrics_addr or "off")
    elector.start()
    try:
        coord.run()
    finally:
        elector.stop(release=True)
        if server is not None:
            server.close()
        log.info("coordinator_stopped", rounds=coord.stats.rounds)
