"""Prometheus metrics, served on a loopback port (``[metrics]``).

Counters and histograms are updated where things happen (SCP, routing, jobs, outbox);
queue depths, HL7 ACK counts and the engine in use are read at scrape time from the
database and the components, so they are never stale and cost nothing between scrapes.
Labels carry no PHI: AE titles, status codes, rule names, stages, destinations.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dicom_node.db import NodeDB

log = logging.getLogger("osteoscreen.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter("osteoscreen_instances_received", "C-STORE instances stored (durable) or recognised "
                             "as duplicates", ["calling_ae", "duplicate"], registry=REGISTRY)
INSTANCES_REFUSED = Counter("osteoscreen_instances_refused", "C-STORE requests answered with a failure status",
                            ["status"], registry=REGISTRY)
SERIES_COMPLETED = Counter("osteoscreen_series_completed", "Series that went quiet and were routed",
                           registry=REGISTRY)
SERIES_ROUTED = Counter("osteoscreen_series_routed", "Routing decisions: screen, or skip with the rule that "
                        "skipped it", ["decision", "rule"], registry=REGISTRY)
JOBS_FINISHED = Counter("osteoscreen_jobs_finished", "Screening jobs by outcome", ["outcome"], registry=REGISTRY)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
JOB_STAGE_SECONDS = Histogram("osteoscreen_job_stage_seconds", "Time per job stage (decode, selection, "
                              "measurement, model, shap, report, ...)", ["stage"], buckets=STAGE_BUCKETS,
                              registry=REGISTRY)
INFERENCE_SECONDS = Histogram("osteoscreen_inference_seconds", "Fused-model inference per job, by engine backend",
                              ["backend"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
                              registry=REGISTRY)
OUTBOX_SENT = Counter("osteoscreen_outbox_sent", "Result objects delivered", ["destination"], registry=REGISTRY)
OUTBOX_RETRIES = Counter("osteoscreen_outbox_retries", "Failed delivery attempts (each is retried with backoff)",
                         ["destination"], registry=REGISTRY)


class NodeStateCollector(Collector):
    """Queue depths from the state database; HL7 ACK counts and the engine from the running components."""

    def __init__(self, db: NodeDB, hl7_acks: Callable[[], dict[str, int]] | None,
                 engine: dict[str, str]) -> None:
        self.db, self.hl7_acks, self.engine = db, hl7_acks, engine

    def describe(self) -> Iterable:
        return []  # collected at scrape time only

    def collect(self) -> Iterable:
        q = GaugeMetricFamily("osteoscreen_queue_depth", "Items waiting, by queue", labels=["queue"])
        for name, sql in (("series_receiving", "SELECT count(*) FROM series WHERE state='receiving'"),
                          ("jobs_pending", "SELECT count(*) FROM jobs WHERE state='pending'"),
                          ("jobs_running", "SELECT count(*) FROM jobs WHERE state IN ('running', 'rerun')"),
                          ("jobs_failed", "SELECT count(*) FROM jobs WHERE state='failed'"),
                          ("outbox_pending", "SELECT count(*) FROM outbox WHERE state='pending'")):
            q.add_metric([name], float(self.db._query(sql)[0][0]))
        yield q
        if self.hl7_acks is not None:
            acks = CounterMetricFamily("osteoscreen_hl7_acks", "HL7 messages answered, by ACK code "
                                       "(AA/CA accepted, AE/CE error, AR/CR rejected)", labels=["code"])
            for code, n in sorted(self.hl7_acks().items()):
                acks.add_metric([code], float(n))
            yield acks
        info = InfoMetricFamily("osteoscreen_engine", "Models and inference backend in use")
        info.add_metric([], self.engine)
        yield info


def serve(host: str, port: int, collector: NodeStateCollector):
    """Start the HTTP endpoint (``/metrics``); returns the server (``server_port``, ``shutdown()``)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise OSError(f"metrics endpoint {host}:{port}: {exc.strerror or exc}; choose another [metrics] port "
                      "or set [metrics] enabled = false") from None
    REGISTRY.register(collector)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def unregister(collector: NodeStateCollector) -> None:
    try:
        REGISTRY.unregister(collector)
    except KeyError:
        pass
