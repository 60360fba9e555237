"""equilibriumctl: inspect the node's Equilibrium datapath.

Reads the pinned maps directly, so it works whether or not the agent runs.
Data goes to stdout, errors to stderr; exit 0 ok, 1 runtime failure, 2 usage.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .. import views
from ..datapath import constants, libbpf
from ..datapath.maps import Datapath, DatapathMissing

PIN_DIR = click.option("--pin-dir", default=lambda: os.environ.get("EQUILIBRIUM_PIN_DIR", constants.DEFAULT_PIN_DIR),
                       show_default="$EQUILIBRIUM_PIN_DIR or %s" % constants.DEFAULT_PIN_DIR,
                       help="bpffs directory the datapath is pinned in")
OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)


def _open(pin_dir: str) -> Datapath:
    try:
        return Datapath(pin_dir)
    except DatapathMissing as e:
        raise click.ClickException(str(e))
    except libbpf.BpfError as e:
        hint = " (run as root)" if e.errno in (1, 13) else ""
        raise click.ClickException("cannot open the pinned maps: %s%s" % (e, hint))


def _emit(data: Any, output: str, table: str) -> None:
    click.echo(json.dumps(data, indent=2) if output == "json" else table)


@click.group(help=__doc__)
def cli() -> None:
    pass


@cli.command(help="List services: frontend, protocol, backends, selections.")
@PIN_DIR
@OUTPUT
def services(pin_dir: str, output: str) -> None:
    with _open(pin_dir) as dp:
        rows = views.services(dp)
    _emit({"services": rows}, output, views.render_table(rows, [
        ("id", "ID"), ("name", "NAME"), ("frontend", "FRONTEND"), ("protocol", "PROTO"),
        ("backends_available", "AVAIL"), ("backends_total", "BACKENDS"), ("selections_total", "SELECTIONS"),
        ("no_backend_total", "NO-BACKEND")]))


@cli.command(help="Show one service's backends: address, state, weight, share of slots, selections.")
@click.argument("service")
@PIN_DIR
@OUTPUT
def backends(service: str, pin_dir: str, output: str) -> None:
    with _open(pin_dir) as dp:
        try:
            data = views.backends(dp, service)
        except views.UnknownService as e:
            raise click.ClickException(str(e))
    head = "%s  %s/%s" % (data["name"], data["frontend"], data["protocol"])
    rows = [dict(r, latency_p50=_ms(r["latency_p50_seconds"]), latency_p99=_ms(r["latency_p99_seconds"]),
                 rtt=_ms(r["rtt_seconds"])) for r in data["backends"]]
    _emit(data, output, head + "\n" + views.render_table(rows, [
        ("id", "ID"), ("address", "ADDRESS"), ("state", "STATE"), ("weight", "WEIGHT"),
        ("share", "SHARE"), ("selections_total", "SELECTIONS"), ("connections_total", "CONNS"),
        ("connect_errors_total", "CONN-ERR"), ("requests_total", "REQS"), ("responses_5xx_total", "5XX"),
        ("error_ratio", "ERR-RATIO"), ("latency_p50", "P50"), ("latency_p99", "P99"), ("rtt", "RTT")]))


@cli.command(help="Per-caller counts: connections, requests and errors per (caller cgroup, service).")
@click.argument("service", required=False)
@PIN_DIR
@OUTPUT
def callers(service: str | None, pin_dir: str, output: str) -> None:
    with _open(pin_dir) as dp:
        try:
            rows = views.callers(dp, service)
        except views.UnknownService as e:
            raise click.ClickException(str(e))
    _emit({"callers": rows}, output, views.render_table(rows, [
        ("service", "SERVICE"), ("cgroup_id", "CGROUP-ID"), ("connections_total", "CONNS"),
        ("requests_total", "REQS"), ("errors_total", "ERRORS")]))


def _ms(v: float | None) -> str:
    return "-" if v is None else "%.3gms" % (v * 1e3)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
