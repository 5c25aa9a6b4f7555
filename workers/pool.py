"""The workers' Celery pool: Celery's threads pool, made able to stop cold.

A cold shutdown (SIGQUIT: what `train`'s supervisor and an operator send to stop a worker without waiting for its
episodes) cancels the requests the worker holds. Celery's threads pool cannot: its `terminate_job` raises
NotImplementedError out of the signal handler, and its stop then waits for every running episode thread (minutes),
so the worker neither hands its episodes back nor exits. A Python thread cannot be killed, and nothing needs to be:
the episode's message is still unacked (`task_acks_late`), so the consumer's channel gives it back to the broker
when it closes during the shutdown, and the next worker plays it. This pool therefore

- treats cancelling a running episode as "leave it unacked" (`terminate_job` and the result's `terminate` do
  nothing),
- does not wait for running threads when the stop is cold (`state.should_terminate`, set by Celery's cold-shutdown
  handler before it stops the pool); a warm stop (SIGTERM) still waits for them to finish, as before.

`exit_after_cold_stop` ends the process once the worker has shut down: the episode threads still running would
otherwise hold the interpreter's exit open until they return.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery.concurrency.thread import ApplyResult
from celery.concurrency.thread import TaskPool as _ThreadsPool
from celery.worker import state

log = logging.getLogger("gopo.worker")


class _Result(ApplyResult):
    def terminate(self, signal: int | None = None) -> None:  # noqa: ARG002 - Celery's signature
        """A running episode is not stopped; its message stays unacked and goes back to the broker."""


class EpisodeThreadPool(_ThreadsPool):
    """Celery's threads pool whose cold stop hands running episodes back instead of failing or waiting for them."""

    def on_apply(self, *args: Any, **kwargs: Any) -> _Result:
        return _Result(super().on_apply(*args, **kwargs).f)

    def terminate_job(self, pid: int, signal: int | None = None) -> None:  # noqa: ARG002 - Celery's signature
        """Cancelling a running request: nothing to kill (a thread); the unacked message goes back on disconnect."""

    def on_stop(self) -> None:
        if state.should_terminate:  # cold: do not wait for the episode threads
            running = sum(1 for t in self.executor._threads if t.is_alive())
            log.info("cold stop: %d episode thread(s) left running; their episodes go back to the queue", running)
            self.executor.shutdown(wait=False, cancel_futures=True)
            return
        super().on_stop()


def cold_stopped() -> bool:
    """Whether this process's worker was stopped by a cold shutdown (SIGQUIT)."""
    return bool(state.should_terminate)


def exit_after_cold_stop(code: int = 0) -> None:
    """End the process now after a cold stop: threads still playing episodes must not keep it alive (their episodes
    were given back to the broker when the worker's connection closed)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
