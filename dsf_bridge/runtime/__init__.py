"""The daemon: Task intake, job, timer and outbox workers, supervision and graceful shutdown."""
