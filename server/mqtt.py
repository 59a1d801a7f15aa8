"""One MQTT session per component: connects, resubscribes after every reconnect, and hands each
message to a callback. Publishing waits (bounded) for a connection instead of failing at once,
so a short broker outage costs latency, not messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import aiomqtt

from server.config import MqttConfig
from server.errors import Unavailable

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]


class MqttSession:
    """Async context manager around a reconnecting aiomqtt client.

    `handler(topic, payload)` runs for each message on the subscribed topics, one at a time;
    a handler that raises is logged and the session carries on. Long work belongs in a task
    the handler starts, not in the handler.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        subscriptions: Sequence[str] = (),
        handler: MessageHandler | None = None,
        *,
        clean_session: bool = False,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.handler = handler
        self.clean_session = clean_session
        self.max_backoff_s = max_backoff_s
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connects = 0

    async def __aenter__(self) -> MqttSession:
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        try:
            await self.wait_connected(10.0)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._connected.clear()

    async def wait_connected(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise Unavailable(
                f"mqtt: no connection to {self.config.host}:{self.config.port} within {timeout}s"
            ) from None

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Publish, waiting up to `timeout` for a (re)connection; Unavailable after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.wait_connected(max(0.0, deadline - loop.time()))
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(
                    topic, payload, qos=qos, timeout=max(0.1, deadline - loop.time())
                )
                return
            except aiomqtt.MqttError as exc:
                if loop.time() >= deadline:
                    raise Unavailable(f"mqtt: publish to {topic} failed: {exc}") from None
                self._connected.clear()
                await asyncio.sleep(0.05)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                async with aiomqtt.Client(
                    self.config.host,
                    self.config.port,
                    identifier=self.client_id,
                    clean_session=self.clean_session,
                    keepalive=self.config.keepalive,
                    # Small QoS 1 messages otherwise wait ~40 ms on Nagle + delayed ACK per hop.
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                ) as client:
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    self._client = client
                    self.connects += 1
                    self._connected.set()
                    backoff = 0.05
                    log.info(
                        "[mqtt] %s connected to %s:%d",
                        self.client_id,
                        self.config.host,
                        self.config.port,
                    )
                    async for message in client.messages:
                        await self._dispatch(message)
            except aiomqtt.MqttError as exc:
                log.warning(
                    "[mqtt] %s disconnected: %s; retrying in %.2fs", self.client_id, exc, backoff
                )
            finally:
                self._connected.clear()
                self._client = None
            # Exponential backoff with jitter so a fleet does not reconnect in lockstep.
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.max_backoff_s, backoff * 2)

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        if self.handler is None:
            return
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload or "").encode()
        try:
            await self.handler(message.topic.value, data)
        except Exception:
            log.exception("[mqtt] %s handler failed on %s", self.client_id, message.topic.value)
