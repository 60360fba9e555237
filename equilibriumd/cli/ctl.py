"""equilibriumctl: inspect the node's Equilibrium datapath.

Reads the pinned maps directly, so it works whether or not the agent runs.
Data goes to stdout, errors to stderr; exit 0 ok, 1 runtime failure, 2 usage.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from .. import views
from ..agent import admin
from ..datapath import libbpf
from ..datapath.maps import Datapath, DatapathMissing
from .options import PIN_DIR

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)


def _open(pin_dir: str) -> Datapath:
    try:
        return Datapath(pin_dir)
    except DatapathMissing as e:
        raise click.ClickException(str(e)) from e
    except libbpf.BpfError as e:
        hint = " (run as root)" if e.errno in (1, 13) else ""
        raise click.ClickException("cannot open the pinned maps: %s%s" % (e, hint)) from e


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
        ("backends_available", "AVAIL"), ("backends_total", "BACKENDS"), ("balance", "BALANCE"),
        ("selections_total", "SELECTIONS"), ("no_backend_total", "NO-BACKEND")]))


@cli.command(help="Show one service's backends: address, state, weight, share of slots, selections, open "
                  "connections, connections the rebalancer moved (MOVED: closed so their pool reconnects by "
                  "the weights; '-' when the rebalancer is not loaded).")
@click.argument("service")
@PIN_DIR
@OUTPUT
def backends(service: str, pin_dir: str, output: str) -> None:
    with _open(pin_dir) as dp:
        try:
            data = views.backends(dp, service)
        except views.UnknownService as e:
            raise click.ClickException(str(e)) from e
    head = "%s  %s/%s  balance %s" % (data["name"], data["frontend"], data["protocol"], data["balance"])
    rows = [dict(r, latency_p50=_ms(r["latency_p50_seconds"]), latency_p99=_ms(r["latency_p99_seconds"]),
                 rtt=_ms(r["rtt_seconds"])) for r in data["backends"]]
    _emit(data, output, head + "\n" + views.render_table(rows, [
        ("id", "ID"), ("address", "ADDRESS"), ("state", "STATE"), ("weight", "WEIGHT"),
        ("share", "SHARE"), ("selections_total", "SELECTIONS"), ("active_connections", "OPEN"),
        ("connections_total", "CONNS"), ("rebalanced_total", "MOVED"), ("connect_errors_total", "CONN-ERR"),
        ("requests_total", "REQS"),
        ("responses_5xx_total", "5XX"),
        ("error_ratio", "ERR-RATIO"), ("latency_p50", "P50"), ("latency_p99", "P99"), ("rtt", "RTT")]))


@cli.command(help="Where the next N connections to SERVICE would go: the kernel's own pick rule "
                  "(equilibriumd.datapath.pick) sampled on the live slot table, the shares its slots carry, the "
                  "open-connection counts and the service's balance. The prediction holds the current open "
                  "counts fixed (like Katran's 'where does this flow go' simulator); in the kernel every "
                  "connection that stays open adds to its backend's count, so under balance p2c a long burst "
                  "spreads more evenly than predicted. Reads the pinned maps only; needs no running agent.")
@click.argument("service")
@click.option("-n", "--connects", "n", type=click.IntRange(1, 10_000_000), default=1000, show_default=True,
              help="connections to predict")
@click.option("--seed", type=int, default=None, help="seed for the sampling (default: fresh entropy)")
@PIN_DIR
@OUTPUT
def pick(service: str, n: int, seed: int | None, pin_dir: str, output: str) -> None:
    with _open(pin_dir) as dp:
        try:
            data = views.pick(dp, service, n, seed)
        except views.UnknownService as e:
            raise click.ClickException(str(e)) from e
    head = "%s  %s/%s  balance %s  next %d connects (open counts held fixed)" % (
        data["name"], data["frontend"], data["protocol"], data["balance"], data["connects"])
    if data["unrouted_connects"]:
        head += "  %d would fail (no backend)" % data["unrouted_connects"]
    _emit(data, output, head + "\n" + views.render_table(data["backends"], [
        ("id", "ID"), ("address", "ADDRESS"), ("state", "STATE"), ("share", "SHARE"),
        ("active_connections", "OPEN"), ("predicted_connects", "NEXT"), ("predicted_share", "NEXT-SHARE")]))


@cli.command(help="Per (caller cgroup, service): connections, requests and errors; the evidence the caller "
             "holds about the service's backends lately; its standing in the cooperation game (state, "
             "reputation, fair share: from the running agent) and its admission budget if it has one, with "
             "the reason that binds (punished: cooperation; shed: the load is over capacity; defended: "
             "the zero-sum flood defence).")
@click.argument("service", required=False)
@PIN_DIR
@OUTPUT
def callers(service: str | None, pin_dir: str, output: str) -> None:
    with _open(pin_dir) as dp:
        try:
            rows = views.callers(dp, service)
        except views.UnknownService as e:
            raise click.ClickException(str(e)) from e
    try:  # pod names and standings come from a running agent; the counts need none
        resp = admin.ask(pin_dir, {"cmd": "callers"})
    except admin.AgentUnavailable:
        resp = {}
    pods = resp.get("pods", {})
    standing = {(s.get("cgroup_id", s.get("cgroup")), s["service"]): s for s in resp.get("standings", [])}
    for r in rows:
        r["pod"] = pods.get(str(r["cgroup_id"]))
        st = standing.get((r["cgroup_id"], r["service"]), {})
        r["state"] = st.get("state", "cooperating")
        r["reputation"] = st.get("reputation")
        r["fair_share_per_second"] = st.get("share")
        r["demand_per_second"] = st.get("demand")
        r["punish_left"] = st.get("punish_left", 0)
        # why it has a budget (the reason that binds) and every source that wants one
        r["reason"] = st.get("reason") if r.get("budget_per_second") is not None else None
        r["reasons"] = list(st.get("reasons") or ()) if r["reason"] else []
    _emit({"callers": rows}, output, views.render_table(rows, [
        ("service", "SERVICE"), ("cgroup_id", "CGROUP-ID"), ("pod", "POD"), ("connections_total", "CONNS"),
        ("requests_total", "REQS"), ("errors_total", "ERRORS"), ("evidence_requests", "EV-REQS"),
        ("evidence_failures", "EV-FAILS"), ("state", "STATE"), ("reputation", "REPUTATION"),
        ("reason", "REASON"), ("budget_per_second", "BUDGET/S"), ("throttled_total", "THROTTLED")]))


def _ask(pin_dir: str, req: dict[str, Any]) -> dict[str, Any]:
    try:
        resp = admin.ask(pin_dir, req)
    except admin.AgentUnavailable as e:
        raise click.ClickException(str(e)) from e
    if not resp.get("ok"):
        raise click.ClickException(resp.get("error", "the agent refused the request"))
    return resp


def _status_text(resp: dict[str, Any]) -> str:
    a = resp["agent"]
    head = ("agent pid %s  up %ss  ticks %s  tick %.3gs (last took %.2f ms)  map errors %s  rss %.1f MB\n"
            "config %s  pin dir %s  cgroup %s\n" % (
                a.get("pid"), int(time.time() - a.get("started_unix", time.time())), a.get("ticks"),
                a.get("tick_seconds", 0), 1e3 * (a.get("last_tick_duration_seconds") or 0), a.get("map_errors_total"),
                (a.get("rss_bytes") or 0) / 1e6, a.get("config_file"), a.get("pin_dir"), a.get("cgroup")))
    rows = [{"name": s["name"], "policy": s["policy"], "status": "failed" if s.get("error") else s["status"],
             "distance": s["distance"], "gap": _ms(s["wardrop_gap_seconds"]),
             "weights": " ".join("%.2f" % (b["probability"] or 0) for b in s["backends"]),
             "quarantined": sum(1 for b in s["backends"] if b["quarantined"])} for s in resp["services"]]
    coord = a.get("coordination")
    cols = [("name", "SERVICE"), ("policy", "POLICY"), ("status", "STATUS"), ("distance", "DISTANCE"),
            ("gap", "WARDROP-GAP"), ("weights", "WEIGHTS"), ("quarantined", "QUARANTINED")]
    if isinstance(coord, dict):   # --coordinator: whether each service follows it, and why not
        per = coord.get("services") or {}
        for r in rows:
            why = per.get(r["name"])
            r["coordinator"] = "-" if why is None else "following" if why == "following" else "alone: " + why
        cols.append(("coordinator", "COORDINATOR"))
    failing = a.get("services_failing") or {}
    tail = "".join("\nservice %s: its policy failed (%s); it keeps its last tables until a reload" % kv
                   for kv in sorted(failing.items()))
    left = a.get("services_not_admitted") or []
    if left:
        tail += "\nnot admitted (the maps are full; admitted as room frees up): %s" % " ".join(left[:20]) + \
            (" ... %d more" % (len(left) - 20) if len(left) > 20 else "")
    for name, c in sorted((a.get("services_capped") or {}).items()):
        tail += "\nservice %s: %d of its %d endpoints used (backend slots shared fairly)" % (
            name, c["kept"], c["offered"])
    if a.get("discovery_failing_for"):
        tail += ("\nkubernetes API: %s failed calls in a row (%s); routing goes on over the last listed services"
                 % (a["discovery_failing_for"], a.get("discovery_last_error") or "?"))
    if a.get("tick_errors_total"):
        tail += "\ntick errors: %s (the agent's log has the tracebacks)" % a["tick_errors_total"]
    if isinstance(coord, dict):
        age = coord.get("recommendation_age_seconds")
        falls = {k: v for k, v in (coord.get("fallbacks") or {}).items() if v}
        tail += ("\ncoordinator: node %s follows it for %d of %d summarised services; newest recommendation %s; "
                 "fallbacks %s; summaries published %s (failed %s)" % (
                     coord.get("node"), len(coord.get("following") or []), len(coord.get("services") or {}),
                     "none yet" if age is None else "%.1fs old" % age,
                     " ".join("%s=%s" % kv for kv in sorted(falls.items())) or "none",
                     coord.get("published"), coord.get("publish_failures")))
    return head + views.render_table(rows, cols) + tail


@cli.command(help="The agent's health and every service's equilibrium status (asks the running agent).")
@PIN_DIR
@OUTPUT
def status(pin_dir: str, output: str) -> None:
    resp = _ask(pin_dir, {"cmd": "status"})
    resp.pop("ok", None)
    _emit(resp, output, _status_text(resp))


def _explain_text(svc: dict[str, Any]) -> str:
    head = "%s  %s/%s  policy %s  balance %s  status %s  distance %s  wardrop gap %s  regret potential %s\n" % (
        svc["name"], svc["frontend"], svc["protocol"], svc["policy"], svc.get("balance", "-"), svc["status"],
        _fmt(svc["distance"]),
        _ms(svc["wardrop_gap_seconds"]), _fmt(svc["regret_potential"]))
    rows = [dict(b, lat=_ms(b["latency_seconds"]), eff=_ms(b["effective_latency_seconds"])) for b in svc["backends"]]
    table = views.render_table(rows, [
        ("address", "BACKEND"), ("state", "STATE"), ("probability", "WEIGHT"), ("lat", "LATENCY"),
        ("eff", "EFFECTIVE"), ("requests", "REQS/TICK"), ("errors", "ERRS/TICK"), ("payoff", "PAYOFF"),
        ("regret", "REGRET"), ("p_failing", "P(FAILING)")])
    evidence = "\n".join(
        "  %s  cgroup %d: %g requests, %g failures, %g of them corroborated by the other callers%s" % (
            b["address"], c["cgroup"], c["requests"], c["failures"], c["counted_failures"],
            "" if c["counted_failures"] >= c["failures"] else " (the rest did not move its weight)")
        for b in svc["backends"] for c in b.get("callers", []))
    changes = "\n".join("  %s  %s  %s" % (time.strftime("%H:%M:%S", time.localtime(c["at"])),
                                           c["why"], " ".join("%s=%.2f" % kv for kv in c["weights"].items()))
                        for c in svc.get("changes", [])[-8:])
    why = ("\nWhy: payoff = -log((latency + floor) / (best + floor)) with failed requests costing the error "
           "penalty; regret is the discounted RM+ regret; weights follow regret (plus a prior for backends "
           "as good as the best), P(failing) above the threshold quarantines to a trickle. With balance p2c "
           "the kernel draws two slots per connection and takes the backend with fewer open connections "
           "per slot, so realized shares can differ from WEIGHT under load.")
    return (head + table + ("\ncallers' evidence (last second or so):\n" + evidence if evidence else "")
            + ("\nlast changes:\n" + changes if changes else "")
            + (why if svc["policy"].startswith("equilibrium") else ""))


@cli.command(help="Why a service has its weights: payoffs, regrets, beliefs, convergence, last changes.")
@click.argument("service")
@PIN_DIR
@OUTPUT
def explain(service: str, pin_dir: str, output: str) -> None:
    resp = _ask(pin_dir, {"cmd": "explain", "service": service})
    _emit(resp["explain"], output, _explain_text(resp["explain"]))


@cli.command(help="A live view of status (or of one service), refreshed every interval; Ctrl-C stops.")
@click.argument("service", required=False)
@click.option("--interval", type=click.FloatRange(0.1, 3600.0), default=1.0, show_default=True,
              help="seconds between refreshes (0.1 to 3600)")
@click.option("--count", type=int, default=0, help="stop after this many refreshes (0: until Ctrl-C)")
@PIN_DIR
def watch(service: str | None, interval: float, count: int, pin_dir: str) -> None:
    n = 0
    try:
        while True:
            if service:
                text = _explain_text(_ask(pin_dir, {"cmd": "explain", "service": service})["explain"])
            else:
                text = _status_text(_ask(pin_dir, {"cmd": "status"}))
            if sys.stdout.isatty():
                click.echo("\x1b[2J\x1b[H", nl=False)
            click.echo(time.strftime("%H:%M:%S ") + text + "\n")
            n += 1
            if count and n >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


def _fmt(v: Any) -> str:
    return "-" if v is None else ("%.3g" % v if isinstance(v, float) else str(v))


def _ms(v: float | None) -> str:
    return "-" if v is None else "%.3gms" % (v * 1e3)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
