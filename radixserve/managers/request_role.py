"""The role seam: where a request's life differs with the server's role.

A colocated server (the default) prefills and decodes every request. Under
prefill/decode disaggregation (disaggregation/) a prefill-only server hands a request's
KV to its decode server after the prompt instead of decoding it, and a decode-only server
starts from KV it receives; those roles implement the same calls, which the scheduler
makes at fixed points of a request's life and of its step.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from radixserve.configs.disaggregation_config import DisaggregationConfig
from radixserve.core.req import Req
from radixserve.managers.kv_accounting import DevicePool, KVAccounting
from radixserve.managers.output_processor import OutputProcessor


class RequestRole(Protocol):
    def check_request(self, req: Req) -> None:
        """A new request, before anything is set up for it: ValueError refuses it."""

    def enqueue(self, req: Req, waiting: list[Req]) -> None:
        """Queue an accepted request: the waiting queue, or the role's own."""

    def decodes_here(self, req: Req) -> bool:
        """Called once a request's prompt is fully prefilled: whether it joins this
        server's running batch."""

    def poll(self) -> list[Req]:
        """At the start of each step: move the requests the role holds along; returns
        those that join the running batch now."""

    def has_work(self) -> bool:
        """Whether the role holds requests that need the step to keep running."""

    def num_held(self) -> int:
        """Requests the role holds outside the waiting queue and the running batch."""

    def idle_wait(self, timeout_s: float) -> None:
        """Nothing but the role's requests to do: wait up to timeout_s for news."""


class ColocatedRole:
    """Prefill and decode on this server."""

    def check_request(self, req: Req) -> None:
        pass

    def enqueue(self, req: Req, waiting: list[Req]) -> None:
        waiting.append(req)

    def decodes_here(self, req: Req) -> bool:
        return True

    def poll(self) -> list[Req]:
        return []

    def has_work(self) -> bool:
        return False

    def num_held(self) -> int:
        return 0

    def idle_wait(self, timeout_s: float) -> None:
        pass


def make_role(config: DisaggregationConfig, kv: KVAccounting, kv_pool: DevicePool,
              page_size: int, output: OutputProcessor,
              abort: Callable[[str, dict[str, Any]], None]) -> RequestRole:
    """The role --disaggregation-mode asks for."""
    if config.mode == "prefill":
        from radixserve.disaggregation.prefill import PrefillRole

        return PrefillRole(config, kv, kv_pool, page_size, output.finish, abort)
    if config.mode == "decode":
        from radixserve.disaggregation.decode import DecodeRole

        return DecodeRole(config, kv, kv_pool, page_size, output.finish, output.emit,
                          output.check_finished)
    return ColocatedRole()
