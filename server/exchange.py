"""Send messages to sites and collect their replies, polling the SuperLink briskly.

Flower 1.42's deployed grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between pulls for
replies, which alone adds 1.5 s on average to every exchange of every round. This does the same
push-then-pull through the grid's public ``push_messages`` / ``pull_messages`` with a short poll;
the pulls go from the ServerApp process to the SuperLink next to it, so polling is cheap.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.common.messages import REFUSAL_ERROR_CODE, SITE_RECORD, Refusal

POLL_SECONDS = 0.1


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None, poll: float = POLL_SECONDS) -> list[Message]:
    """Push ``messages``; return the replies that arrive before ``timeout`` seconds (None: wait for all)."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending:
            break
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(poll, left))
        else:
            time.sleep(poll)
    return replies


class WatchedGrid:
    """The run's grid, remembering which node each pushed message went to and which were answered.

    Wrapped around the grid for one round's exchanges (plain or SecAgg+, whose workflow sends
    through :func:`send_and_receive`), it tells afterwards which sampled sites never answered by
    the deadline, and which node a SuperLink-made error reply (``NODE_UNAVAILABLE``, sent from
    the SuperLink's own node id) stands for.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sent: dict[str, int] = {}  # message id -> destination node id
        self.answered: set[str] = set()
        self.replies: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)  # a deployed grid iterates them twice
        ids = list(self._grid.push_messages(messages))
        for msg in messages:
            if msg.metadata.message_id:  # set by push_messages on both of Flower's grids
                self.sent[msg.metadata.message_id] = msg.metadata.dst_node_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(self._grid.pull_messages(message_ids))
        for reply in got:
            self.answered.add(reply.metadata.reply_to_message_id)
        self.replies += got
        return got

    def node_of(self, reply: Message) -> int:
        """The site a reply stands for: its sender, or the destination of the message it answers."""
        return self.sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def unanswered(self) -> list[int]:
        """Nodes with a message that got no reply, each once, in the order they were sent to."""
        return list(dict.fromkeys(node for mid, node in self.sent.items() if mid not in self.answered))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class NodeNames:
    """Site names by node id, learnt from the replies that carry one (a train reply, a refusal).

    A reply that carries no name (Flower's own error for a crashed ClientApp, a timeout) is named
    from an earlier reply of the same node, else ``node <id>``.
    """

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def learn(self, replies: Iterable[Message], grid: WatchedGrid) -> None:
        for reply in replies:
            claimed = claimed_name(reply)
            if claimed:
                self._names[grid.node_of(reply)] = claimed

    def name(self, node_id: int) -> str:
        return self._names.get(node_id, f"node {node_id}")

    def of(self, reply: Message, grid: WatchedGrid) -> str:
        return claimed_name(reply) or self.name(grid.node_of(reply))


def claimed_name(reply: Message) -> str | None:
    """The site name a reply carries (its site record, or a fedtune refusal's ``site=``), if any."""
    if reply.has_error():
        if reply.error.code != REFUSAL_ERROR_CODE:
            return None
        refusal = Refusal.parse(reply.error.reason)
        return refusal.site if refusal is not None and refusal.site else None
    if SITE_RECORD in reply.content.config_records:
        name = reply.content.config_records[SITE_RECORD].get("name")
        return str(name) if name else None
    return None
