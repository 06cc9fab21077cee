"""Observability: Prometheus collectors, the scheduler's batch log lines, request logs,
tracing and the one log format every process uses.

Nothing here imports the managers: the scheduler side plugs in through the output hooks
(managers/output_processor.py) and reads the scheduler through `SchedulerState`; the
TokenizerManager calls a `RequestObserver`. With metrics, request logs and tracing off
the observers are null objects, and prometheus_client / opentelemetry are never
imported.
"""
