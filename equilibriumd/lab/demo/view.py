"""The live terminal view (ANSI clear + a table, once a second) and the final summary table."""

from __future__ import annotations

from typing import Any

CLEAR = "\x1b[2J\x1b[H"
BAR = 20


def _ms(v: float | None) -> str:
    return "-" if v is None else ("%.0fms" % (v * 1e3) if v >= 0.0995 else "%.1fms" % (v * 1e3))


def _bar(x: float | None) -> str:
    if x is None:
        return " " * BAR
    n = max(0, min(BAR, int(round(x * BAR))))
    return "#" * n + "." * (BAR - n)


def render(frame: dict[str, Any]) -> str:
    """frame: t, duration, events [(t, label, done)], agent (status['agent'] or None),
    services: [{name, status, distance, rate, p99, errors, backends: [{name, weight, share, note}]}]."""
    a = frame.get("agent") or {}
    lines = ["Equilibrium demo: UrbanMove on loopback, policy equilibrium      t = %5.1f s / %g s"
             % (frame["t"], frame["duration"]),
             "agent pid %s  ticks %s  last tick %.2f ms  rss %.1f MB  pin dir %s" % (
                 a.get("pid", "-"), a.get("ticks", "-"), 1e3 * (a.get("last_tick_duration_seconds") or 0),
                 (a.get("rss_bytes") or 0) / 1e6, a.get("pin_dir", "-")),
             "timeline: " + "   ".join("[%s] %4.0fs %s" % ("x" if done else " ", t, label)
                                       for t, label, done in frame["events"]),
             "",
             "%-8s %-11s %8s %7s %8s %5s   %-9s %6s %6s  %-*s" % (
                 "SERVICE", "STATUS", "DISTANCE", "REQ/S", "P99", "ERR", "BACKEND", "WEIGHT", "SHARE", BAR,
                 "share of %s (last full second)" % frame.get("unit", "new connections"))]
    for s in frame["services"]:
        for i, b in enumerate(s["backends"]):
            head = ("%-8s %-11s %8s %7s %8s %5s" % (
                s["name"], s.get("status") or "-", "-" if s.get("distance") is None else "%.3f" % s["distance"],
                "%.0f" % s["rate"], _ms(s.get("p99")), s.get("errors", 0))) if i == 0 else " " * 52
            lines.append("%s   %-9s %6s %6s  %s %s" % (
                head, b["name"], "-" if b.get("weight") is None else "%.3f" % b["weight"],
                "-" if b.get("share") is None else "%.3f" % b["share"], _bar(b.get("share")), b.get("note", "")))
        lines.append("")
    lines.append(frame.get("footer", "Ctrl-C stops (everything is cleaned up)"))
    return "\n".join(lines)


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if unit == "ms":
        return "%.1f ms" % (v * 1e3)
    if unit == "MB":
        return "%.1f MB" % (v / 1e6)
    if isinstance(v, float):
        return "%.3f" % v
    return str(v)


def summary_table(s: dict[str, Any]) -> str:
    """The human-readable end of a run."""
    tl = s["timeline"]
    p99 = s["p99_latency_seconds"]
    tick = s.get("agent_tick_seconds") or {}
    pooled = s.get("clients") == "pooled"
    rows = [
        ("bus load", "%.1f %s offered %.0f (others %s)" % (
            s["load"]["bus"]["achieved_rate"], "requests/s from keep-alive pools," if pooled else "connections/s",
            s["load"]["bus"]["offered_rate"],
            ", ".join("%s %.0f/s" % (k, v["achieved_rate"]) for k, v in s["load"].items() if k != "bus"))),
        ("timeline", "%s +%.0f ms at t=%gs, restored at t=%gs, end %gs%s" % (
            tl["slowed_backend"], 1e3 * tl["added_latency_seconds"], tl["slow_at"], tl["restore_at"],
            tl["end"], " (scaled)" if tl["scaled"] else "")),
        ("shift_seconds", _fmt(s["shift_seconds"])),
        ("recovery_seconds", _fmt(s["recovery_seconds"])),
        ("oscillation", "%s (slow period %s, after recovery %s)" % (
            _fmt(s["oscillation"]), _fmt(s["oscillation_slow_period"]), _fmt(s["oscillation_after_recovery"]))),
        ("bus p99 before", _fmt(p99["before"], "ms")),
        ("bus p99 during", _fmt(p99["during"], "ms")),
        ("bus p99 after", _fmt(p99["after"], "ms")),
        ("client errors", "%d of %d requests" % (s["client_errors"], s["requests_total"])),
    ]
    rb = s.get("rebalance") or {}
    p = s.get("pooled")
    if p:
        rows.append(("pooled clients", "%d pools x %d per service: %d connections opened, %.1f %% of requests on a "
                     "reused one, %d dead idle ones replaced, %d requests waited for one (max %s)" % (
                         p["pools_per_service"], p["pool_size"], p["connections_opened"],
                         100.0 * (p["reuse_ratio"] or 0.0), p["dead_replaced"], p["waited"],
                         _fmt(p["wait_max_seconds"], "ms"))))
    if rb and (pooled or rb.get("closed_total")):
        rows.append(("rebalancer", "closed %d connections (%s; %d log events); %s: %s, first %s s after the "
                     "slow-down" % (
            rb.get("closed_total", 0), ", ".join("%s %d" % kv for kv in (rb.get("closed_by_reason") or {}).items()),
            rb.get("events", 0), rb.get("slowed_backend"), _fmt(rb.get("slowed_backend_closed")),
            _fmt(rb.get("slowed_backend_first_close_after_slow_seconds")))))
    rows += [
        ("agent peak RSS", _fmt(s.get("agent_rss_bytes"), "MB")),
        ("agent tick", "median %s, p95 %s, max %s (%s ticks sampled; host load average %s on %s CPUs)" % (
            _fmt(tick.get("median"), "ms"), _fmt(tick.get("p95"), "ms"), _fmt(tick.get("max"), "ms"),
            tick.get("samples", 0), s.get("host", {}).get("loadavg_1_5_15_at_end", ["?"])[0],
            s.get("host", {}).get("cpus"))),
    ]
    out = ["%-18s %s" % r for r in rows]
    out.append("")
    out.append("%-28s %-14s %-12s %s" % ("TARGET", "GOAL", "MEASURED", ""))
    for name, t in s["targets"].items():
        v = t["value"]
        shown = ("%.1f MB" % (v / 1e6) if "rss" in name else "%.2f ms" % (v * 1e3) if "tick" in name
                 else _fmt(v)) if v is not None else "n/a"
        out.append("%-28s %-14s %-12s %s" % (name, t["goal"], shown, "met" if t["met"] else "MISSED"))
    return "\n".join(out)
