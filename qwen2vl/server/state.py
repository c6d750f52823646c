"""What the parts of one server share, built once by the app (`create_app`) and passed to each
part that needs it: the gate (`gate.RequestGate`), the routes (`app.OpenAIServer`) and each
request's job (`jobs.Job`). No part reaches back into the app for it.

`ServerState` owns the engine loop and the media pool: it starts and stops them with the app.
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qwen2vl.engine.async_engine import AsyncEngine
from qwen2vl.processor import MediaPolicy, Processor
from qwen2vl.processor.tokenizer import Tokenizer
from qwen2vl.server.limits import Admission, ServerLimits
from qwen2vl.server.media import server_processor
from qwen2vl.server.metrics import Metrics

Timer = Callable[[float], Awaitable]  # awaited for a request's time limit: asyncio.sleep, or a test's own


@dataclass(eq=False)
class ServerState:
    """One server's shared state: the loaded model and its engine loop, the processor under the
    server's media rules, the limits and the admission under them, the metrics, the media pool,
    the API keys and how they salt the cache, and the request timer."""

    llm: object  # the loaded `Qwen2VL`: its engine's grammars and cache counters
    engine: AsyncEngine
    processor: Processor
    limits: ServerLimits
    admission: Admission
    metrics: Metrics
    media_pool: ThreadPoolExecutor
    max_model_len: int
    vocab_size: int  # rows of the embedding and the head (the tokenizer names fewer)
    api_keys: tuple[str, ...]
    cache_salt_by_key: bool
    timer: Timer
    # Per process: a key's salt never leaves the server, and could not be traced back to the key if it did.
    _salt_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @classmethod
    def build(cls, llm, limits: ServerLimits, media: MediaPolicy, api_key: str | Sequence[str] | None,
              cache_salt_by_key: bool = False, timer: Timer = asyncio.sleep) -> ServerState:
        """The state of a server of `llm` under `limits`, taking images and videos as `media` allows."""
        api_keys = tuple(key for key in ([api_key] if isinstance(api_key, str) else api_key or ()) if key)
        if cache_salt_by_key and not api_keys:
            raise ValueError("cache_salt_by_key needs API keys: without them every client is one user")
        return cls(
            llm=llm,
            engine=AsyncEngine(llm.driver),
            processor=server_processor(llm.processor, media, limits),
            limits=limits,
            admission=Admission(limits.max_requests_in_flight),
            metrics=Metrics(),
            media_pool=ThreadPoolExecutor(limits.media_workers, thread_name_prefix="qwen2vl-media"),
            max_model_len=llm.engine.max_model_len,
            vocab_size=llm.engine.config.text.vocab_size,
            api_keys=api_keys,
            cache_salt_by_key=cache_salt_by_key,
            timer=timer,
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer

    def start(self) -> None:
        """Before serving: the grammar compiler loaded (it holds the GIL for a second or more), then
        the engine thread started."""
        self.llm.engine.grammars.load()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.media_pool.shutdown(wait=False, cancel_futures=True)

    def cache_salt(self, api_key: str | None, salt: str | None) -> str | None:
        """A request's cache salt: its own `salt`; with `cache_salt_by_key`, one of its API key's
        own (the key, and the request's salt if any, hashed under the server's secret)."""
        if not self.cache_salt_by_key:
            return salt
        digest = hashlib.blake2b(key=self._salt_secret, digest_size=32)
        for part in (api_key, salt or ""):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()
