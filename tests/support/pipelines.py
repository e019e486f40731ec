"""For pipeline doubles that define ``publish``: the ``publish_many`` the HTTP batch calls."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from gateway.model import Message, Outcome
from gateway.pipeline import _Outcomes


class PublishMany:
    """``publish_many`` as ``publish`` of each message, collected by the real collector."""

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        raise NotImplementedError

    def publish_many(self, messages: list[Message],
                     on_done: Callable[[list[Outcome]], None]) -> None:
        batch = _Outcomes(len(messages), on_done)
        for index, message in enumerate(messages):
            self.publish(message, partial(batch.settle, index))
        if not messages:
            on_done([])
