"""Domain metrics (Prometheus) and the multiprocess set-up of ``serve --workers N``.

Counters and histograms are module-level, in :data:`DOMAIN` (not the default registry), and
recorded at the edges (routes) or at one point of the audit writer, so domain services stay
free of metrics code.  With several workers, prometheus_client's multiprocess mode makes every
worker write its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` (whichever
worker answers) sums them: counters never jump between scrapes.  The directory is emptied by
:func:`prepare_multiprocess_dir` before the workers start (stale files of a previous run would
otherwise be summed in).

Values read from the database at scrape time (pending approvals, checkpoint age, key-provider
health) are gauges computed by :class:`StateCollector`, so they are the same whichever worker
answers and need no per-process bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sandboxsec.multiproc import MULTIPROC_ENV, multiprocess_dir, prepare_multiprocess_dir

__all__ = [
    "APPROVAL_SECONDS",
    "AUDIT_APPEND_SECONDS",
    "DECISIONS",
    "DOMAIN",
    "MULTIPROC_ENV",
    "VERDICTS",
    "StateCollector",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
    "scrape_registry",
]

DOMAIN = CollectorRegistry(auto_describe=True)

VERDICTS = Counter(
    "sandboxsec_attestation_verdicts_total",
    "Attestation verdicts by status and reason (the first failure's reason code, or none)",
    ["status", "reason"], registry=DOMAIN,
)
DECISIONS = Counter(
    "sandboxsec_policy_decisions_total", "Policy decisions on agent actions", ["decision"],
    registry=DOMAIN,
)
APPROVAL_SECONDS = Histogram(
    "sandboxsec_approval_decision_seconds",
    "From an approval request's creation to a human's approve or deny", ["outcome"],
    registry=DOMAIN,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
AUDIT_APPEND_SECONDS = Histogram(
    "sandboxsec_audit_append_seconds", "Durable audit appends (until committed)",
    registry=DOMAIN,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def scrape_registry(per_app: CollectorRegistry, *extra: Collector) -> CollectorRegistry:
    """What ``/metrics`` renders: in multiprocess mode the sum of every worker's files, else
    this process's HTTP metrics and domain metrics; plus ``extra`` collectors either way."""
    registry = CollectorRegistry()
    if multiprocess_dir() is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for source in (per_app, DOMAIN):
            registry.register(_Forward(source))
    for collector in extra:
        registry.register(collector)
    return registry


class _Forward(Collector):
    """Re-exports another registry's metrics (one scrape, several registries)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._source.collect()


class StateCollector(Collector):
    """Gauges read at scrape time: pending approvals, how long the longest-waiting log's
    uncovered entries have waited for a checkpoint, audit alarms by code, whether the key
    provider answers.  Each database reader returns None when it cannot tell (database
    down): the gauge is then left out rather than reported as zero."""

    def __init__(self, pending: Callable[[], int | None],
                 newest_checkpoints: Callable[[], list[datetime] | None],
                 keys_ok: Callable[[], bool],
                 audit_alarms: Callable[[], Mapping[str, int]] = dict) -> None:
        self._pending = pending
        self._alarms = audit_alarms
        self._newest = newest_checkpoints
        self._keys_ok = keys_ok

    def collect(self) -> Iterator[Metric]:
        pending = self._pending()
        if pending is not None:
            yield GaugeMetricFamily("sandboxsec_approvals_pending",
                                    "Approval requests waiting for a human", value=pending)
        newest = self._newest()
        if newest is not None:
            now = datetime.now(UTC)
            age = max(((now - t).total_seconds() for t in newest), default=0.0)
            yield GaugeMetricFamily(
                "sandboxsec_audit_checkpoint_age_seconds",
                "Seconds since the last checkpoint of the log that has waited longest with "
                "entries no checkpoint covers yet (0: every entry is covered)",
                value=max(0.0, age))
        alarms = GaugeMetricFamily("sandboxsec_audit_alarms",
                                   "Audit logs stopped by an integrity alarm", labels=["code"])
        for code, count in sorted(self._alarms().items()):
            alarms.add_metric([code], count)
        yield alarms
        yield GaugeMetricFamily("sandboxsec_key_provider_up",
                                "1 when the key provider (root key, HSM) answers",
                                value=1.0 if self._keys_ok() else 0.0)


def observe_since(histogram: Histogram, start: float) -> None:
    """Record the time since ``start`` (``time.perf_counter()``)."""
    histogram.observe(time.perf_counter() - start)
