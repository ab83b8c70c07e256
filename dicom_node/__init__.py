"""DICOM networking and the service: SCP, durable instance store, series
completion, routing, jobs, outbox + SCU export, lifecycle and the CLI."""

__version__ = "0.1.0"
