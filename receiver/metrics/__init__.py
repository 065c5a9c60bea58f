"""Prometheus metrics, so that summing any counter over every process scraped gives the
deployment's true figure, and each alert fires once per deployment.

- Each process counts its own work in its own registry (the receiver's callbacks, verification
  latency, refused connections) and serves only that: `sum()` over the receivers is the total. With
  `serve --processes N`, the N processes share prometheus_client's multiprocess files, and any of them
  serves their sum.
- Workers and reconcile count into one Redis hash, in the same step as the change they count (so a
  count survives restarts and is never lost or doubled). Those deployment-wide totals, and the
  deployment's gauges (queue depth, dead letters, workers alive), are served by exactly one of the
  processes being scraped: the holder of a short Redis lease, renewed by each of its scrapes
  (receivers and the workers' metrics servers compete for it). Another process takes over within
  METRICS_LEASE_SECONDS when the holder stops being scraped.
- Every process also serves its own `process_*` metrics (CPU, memory, open files).

One module per idea: `shared` (the counters kept in Redis: written in the step they count, read back
for the exporter), `exporter` (the lease and the deployment's figures one process serves), `minutes`
(callbacks per minute for the ops console), `process_group` (`process_*` of a forked group, from
/proc) and `receiver_registry` (what a receiver process counts and serves).
"""
