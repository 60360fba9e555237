"""The coordinator's Prometheus metrics (names: `equilibrium_coordinator_*`)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .process import Coordinator

#: every family this collector exports (the dashboard test checks against it)
NAMES = (
    "equilibrium_coordinator_leader",
    "equilibrium_coordinator_rounds_total",
    "equilibrium_coordinator_round_errors_total",
    "equilibrium_coordinator_round_seconds",
    "equilibrium_coordinator_last_round_timestamp_seconds",
    "equilibrium_coordinator_summaries",
    "equilibrium_coordinator_services_coordinated",
    "equilibrium_coordinator_recommendations_published_total",
    "equilibrium_coordinator_publish_failures_total",
    "equilibrium_coordinator_obedience_checks_total",
    "equilibrium_coordinator_obedience_violations_total",
    "equilibrium_coordinator_list_failures_total",
    "equilibrium_coordinator_services_left_out",
    "equilibrium_coordinator_recommendations_cut_total",
)


class CoordinatorCollector:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def collect(self) -> Iterator[Metric]:
        st = self.c.stats
        yield GaugeMetricFamily(NAMES[0], "1 while this replica leads (holds the Lease) and acts, else 0.",
                                value=1.0 if st.leader else 0.0)
        yield CounterMetricFamily(NAMES[1], "Rounds completed as leader.", value=st.rounds)
        yield CounterMetricFamily(NAMES[2], "Rounds that raised (logged with a traceback; the next one ran).",
                                  value=st.round_errors)
        yield GaugeMetricFamily(NAMES[3], "Duration of the last round (read, solve, write).",
                                value=st.last_round_seconds)
        if st.last_round_unix:
            yield GaugeMetricFamily(NAMES[4], "Unix time of the last completed round.", value=st.last_round_unix)
        fam = GaugeMetricFamily(NAMES[5], "Node summaries in the last round: fresh (used), stale (unchanged for "
                                "--stale-after), malformed (refused).", labels=["state"])
        for k, v in sorted(st.summaries.items()):
            fam.add_metric([k], float(v))
        yield fam
        yield GaugeMetricFamily(NAMES[6], "Services with several calling nodes given a correlated equilibrium in "
                                "the last round.", value=st.services)
        yield CounterMetricFamily(NAMES[7], "Recommendations written (one per node and service).", value=st.published)
        yield CounterMetricFamily(NAMES[8], "Recommendation objects that could not be written.",
                                  value=st.publish_failures)
        yield CounterMetricFamily(NAMES[9], "Obedience checks run (a node's own summary against its "
                                  "recommendation).", value=st.checks)
        yield CounterMetricFamily(NAMES[10], "Checks where a node would gain, by its own observations, by "
                                  "deviating (it will not follow that recommendation).", value=st.violations)
        yield CounterMetricFamily(NAMES[11], "Rounds skipped because the summaries could not be listed.",
                                  value=st.list_failures)
        yield CounterMetricFamily(NAMES[13], "Recommendations left out of a node's bundle to keep it under the "
                                  "channel's size bound (that node's least loaded services learn alone).",
                                  value=st.cut)
        yield GaugeMetricFamily(NAMES[12], "Services with several calling nodes not solved in the last round: "
                                "over the most loaded --max-services.", value=st.services_left_out)


def make_registry(coordinator: Coordinator) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CoordinatorCollector(coordinator))  # type: ignore[arg-type]
    ProcessCollector(registry=reg)
    return reg
