"""The PNG at the end of a run (matplotlib, Agg backend): three panels over time."""

from __future__ import annotations

from typing import Any

import numpy as np

from .analysis import Requests, p99_series, share_series


def plot(path: str, bus: Requests, samples: list[dict[str, Any]], timeline: dict[str, Any],
         summary: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = timeline["end"]
    t_slow, t_restore = timeline["slow_at"], timeline["restore_at"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 9.5), sharex=True,
                                        gridspec_kw={"height_ratios": [1.3, 1, 1]})
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]

    # 1. shares of new connections (pooled: of requests) in 1 s windows, and the agent's weights
    pooled = summary.get("clients") == "pooled"
    unit = "requests" if pooled else "new connections"
    starts, shares, _ = share_series(bus, 0.0, end, 1.0)
    ts = [x["t"] for x in samples]
    for i, name in enumerate(bus.names):
        c = colors[i % len(colors)]
        label = name + (" (slowed)" if i == timeline["slowed_index"] else "")
        ax1.plot(starts + 0.5, shares[:, i], color=c, lw=1.6, label="%s share of %s" % (label, unit))
        w = [x["weights"][i] if x.get("weights") and i < len(x["weights"]) else np.nan for x in samples]
        ax1.plot(ts, w, color=c, lw=1.0, ls="--", alpha=0.8, label="%s agent weight" % name)
    ax1.axhline(1.0 / bus.n_backends, color="grey", lw=0.6, ls=":")
    ax1.set_ylabel("bus: share / weight")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="upper left", fontsize=7, ncol=3)
    ax1.set_title("UrbanMove demo, policy equilibrium: %s +%.0f ms at t=%gs, restored at t=%gs  "
                  "(bus %.0f %s)" % (timeline["slowed_backend"], 1e3 * timeline["added_latency_seconds"],
                                     t_slow, t_restore, summary["load"]["bus"]["achieved_rate"],
                                     "req/s pooled, %s closed" % (summary.get("rebalance") or {}).get(
                                         "closed_total", 0) if pooled else "conn/s"), fontsize=10)

    # 2. bus p99 latency per 1 s window
    ps, p99 = p99_series(bus, 0.0, end, 1.0)
    ax2.plot(ps + 0.5, p99 * 1e3, color="black", lw=1.4, label="bus p99 (1 s windows, by start time)")
    for i, name in enumerate(bus.names):
        per = np.full(len(ps), np.nan)
        for k, s in enumerate(ps):
            lo, hi = np.searchsorted(bus.t, [s, s + 1.0])
            sel = (bus.backend[lo:hi] == i) & bus.ok[lo:hi]
            if sel.any():
                per[k] = np.percentile(bus.latency[lo:hi][sel], 99)
        ax2.plot(ps + 0.5, per * 1e3, color=colors[i % len(colors)], lw=0.7, alpha=0.6, label="%s p99" % name)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.legend(loc="center right", fontsize=7, ncol=2)

    # 3. convergence: distance to equilibrium and the regret potential (Lyapunov)
    dist = [x.get("distance") for x in samples]
    pot = [x.get("regret_potential") for x in samples]
    ax3.plot(ts, [np.nan if d is None else d for d in dist], color="tab:purple", lw=1.4,
             label="bus distance to equilibrium (Wardrop gap / best latency)")
    ax3.set_yscale("symlog", linthresh=0.01)
    ax3.set_ylabel("distance")
    ax3b = ax3.twinx()
    ax3b.plot(ts, [np.nan if p is None else p for p in pot], color="tab:brown", lw=1.0, ls="--",
              label="regret potential sum(Q+^2) (Lyapunov)")
    ax3b.set_ylabel("regret potential")
    ax3b.set_yscale("symlog", linthresh=0.1)
    h1, l1 = ax3.get_legend_handles_labels()
    h2, l2 = ax3b.get_legend_handles_labels()
    ax3.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7)
    ax3.set_xlabel("seconds since the load started")

    for ax in (ax1, ax2, ax3):
        ax.axvline(t_slow, color="red", lw=1.0, ls="-.")
        ax.axvline(t_restore, color="green", lw=1.0, ls="-.")
        ax.grid(alpha=0.3)
    tr = ax1.get_xaxis_transform()
    slowed = " %s +%.0f ms" % (timeline["slowed_backend"].split()[0], 1e3 * timeline["added_latency_seconds"])
    ax1.text(t_slow, 0.72, slowed, color="red", fontsize=8, transform=tr)
    ax1.text(t_restore, 0.72, " restored", color="green", fontsize=8, transform=tr)
    s = summary
    txt = "shift %s s   recovery %s s   oscillation %s   p99 before/during/after %s ms" % (
        _f(s["shift_seconds"]), _f(s["recovery_seconds"]), _f(s["oscillation"], 3),
        " / ".join(_f(None if v is None else v * 1e3, 1) for v in s["p99_latency_seconds"].values()))
    fig.text(0.01, 0.005, txt, fontsize=8)
    ax3.set_xlim(0, end)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v: float | None, nd: int = 1) -> str:
    return "n/a" if v is None else "%.*f" % (nd, v)
