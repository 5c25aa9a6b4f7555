"""Bounded dispatch: which episodes are in flight, with what request, until when; re-dispatch and hand-back.

`InFlight` keeps at most `max_in_flight` episodes out (never past the episode budget, held back while the
learner's backlog is full), each with its request payload and deadline, so that:
- an episode whose result event never came is counted lost when its deadline passes (`expire`);
- the episodes a dead worker held are sent again under the same episode id (`redispatch`), at once, instead of
  waiting for the broker's redelivery (Redis: `broker.visibility_timeout_s`, 900 s by default). The same id is
  what makes this safe: the worker's done mark skips a copy whose trajectory was already published, and the
  learner's consumer drops a duplicate episode id, so an episode is trained at most once;
- on stop, the episodes still out are handed back (`handed_back()`), persisted in controller.json, and adopted
  by the next run (`adopt`), whose workers play them from the queue.

`send(payload)` is the only contact with the broker (the controller passes Celery's `send_task`), so this is
tested without one. Which episodes a worker holds is read from the workers' hold marks (workers/app.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Out:
    payload: dict[str, Any]
    deadline: float
    sends: int = 1


class InFlight:
    def __init__(
        self,
        request: Callable[[int, int], Any],
        send: Callable[[dict[str, Any]], Any],
        *,
        max_in_flight: int,
        deadline_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`request(index, policy_version)` makes an EpisodeRequest (the controller's `Dispatcher.request`)."""
        self.request = request
        self.send = send
        self.max_in_flight = max_in_flight
        self.deadline_s = deadline_s
        self.clock = clock
        self.out: dict[str, Out] = {}
        self.redispatched = 0

    def __len__(self) -> int:
        return len(self.out)

    def __contains__(self, episode_id: object) -> bool:
        return episode_id in self.out

    def fill(self, next_index: int, version: int, budget_left: int, *, hold_back: bool = False) -> list[str]:
        """Dispatch new episodes from index `next_index` up to the bound; returns their ids (in order)."""
        sent: list[str] = []
        if hold_back:
            return sent
        while len(self.out) < self.max_in_flight and budget_left - len(sent) > 0:
            req = self.request(next_index + len(sent), version)
            # the worker's `queue` timing (Unix time: it is read in another process)
            req = req.model_copy(update={"dispatched_at": time.time()})
            payload = req.model_dump(mode="json")
            self.send(payload)
            self.out[req.episode_id] = Out(payload, self.clock() + self.deadline_s)
            sent.append(req.episode_id)
        return sent

    def finished(self, episode_id: str) -> bool:
        """The episode's result arrived. True if it was ours (counted once: a duplicate event returns False)."""
        return self.out.pop(episode_id, None) is not None

    def expire(self) -> list[str]:
        """Drop and return the episodes past their deadline (their result never came)."""
        now = self.clock()
        late = [eid for eid, o in self.out.items() if now > o.deadline]
        for eid in late:
            del self.out[eid]
        return late

    def redispatch(self, episode_ids: list[str]) -> list[str]:
        """Send these in-flight episodes again with the same id and payload (fresh deadline); returns those sent."""
        sent = []
        for eid in episode_ids:
            o = self.out.get(eid)
            if o is None:
                continue
            self.send(o.payload)
            o.sends += 1
            o.deadline = self.clock() + self.deadline_s
            sent.append(eid)
        self.redispatched += len(sent)
        return sent

    def handed_back(self) -> list[dict[str, Any]]:
        """The payloads still out (to persist on stop; the next run adopts them)."""
        return [o.payload for o in self.out.values()]

    def adopt(self, payloads: list[dict[str, Any]], *, resend: bool) -> list[str]:
        """Take over episodes a previous run handed back; `resend` puts them on the task queue again (needed
        when the previous run's copies may be parked as unacked in the broker)."""
        ids = []
        for payload in payloads:
            eid = str(payload["episode_id"])
            self.out[eid] = Out(dict(payload), self.clock() + self.deadline_s, sends=0)
            ids.append(eid)
        if resend:
            self.redispatch(ids)
        return ids


def sync_allowance(batch_episodes: int, steps_done: int, errors: int, dispatched: int) -> int:
    """Synchronous rollout (`workers.sync`): how many more episodes may be dispatched now. Batch k (k = 0, 1, ...)
    goes out only after the learner pushed the version of step k, so after `steps_done` pushes this run may have
    dispatched batch_episodes x (steps_done + 1) episodes, plus one for each that ended in an error (the learner
    does not train on those, so its batch would never fill)."""
    return max(0, batch_episodes * (steps_done + 1) + errors - dispatched)


def restore_unacked(
    url: str, cfg: Any, *, queue: str, task_ids: set[str] | None = None, timeout_s: float = 5.0
) -> list[str]:
    """Redis only: put messages parked as unacked (their consumer died) back on their queue NOW, instead of after
    `broker.visibility_timeout_s`. Only messages delivered from `queue` (their routing key), and, when `task_ids`
    is given, only Celery tasks with those ids. Returns the ids (task id, else the delivery tag) of what was restored.

    Call it only for messages whose consumer is known dead (a killed worker's held episodes, a dead learner's
    trajectories, every task once all workers stopped): a live consumer's message restored here would be played
    twice (harmless, deduped by episode id, but wasted). The message itself moves, so no copy is made.
    """
    from kombu import Connection

    from gopo_online.stream import is_redis

    if not is_redis(url):
        return []
    restored: list[str] = []
    with Connection(url, connect_timeout=timeout_s, transport_options={"socket_timeout": timeout_s}) as conn:
        channel = conn.default_channel
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            try:
                message, _ex, rk = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if rk != queue:  # (the exchange is stored as "" for a message got from a queue)
                continue
            tid = (message.get("headers") or {}).get("id")
            if task_ids is not None and tid not in task_ids:
                continue
            channel.qos.restore_by_tag(tag, client, leftmost=True)
            restored.append(str(tid or (tag.decode() if isinstance(tag, bytes) else tag)))
    return restored
