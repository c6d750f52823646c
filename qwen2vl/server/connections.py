"""The connections under the app: uvicorn's settings that bound them, and its h11 protocol with a
deadline for each request's headers (uvicorn alone waits for them for ever, so slow or idle
clients could hold every file descriptor). A request's body has its deadline in the gate."""
from __future__ import annotations

import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen2vl.server.limits import ServerLimits

logger = logging.getLogger("qwen2vl.server")

_LATE_HEADERS = b"the request line and headers did not arrive in time"
HEADERS_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_LATE_HEADERS), _LATE_HEADERS))
FILES_BESIDES_CONNECTIONS = 256  # the listening socket, model files, logs, pipes: room kept under the fd limit


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, where a request's line and headers must arrive within
    `header_timeout_s` of the connection's start or of the previous response's end; a connection
    still short of them then gets 408 and is closed (an idle one too)."""

    header_timeout_s: float = ServerLimits.header_timeout_s
    _header_deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_due)

    def _headers_due(self) -> None:
        # IDLE: h11 has not parsed a whole request line and headers since the deadline was set
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(HEADERS_TIMED_OUT)
            self.transport.close()


def uvicorn_options(limits: ServerLimits) -> dict:
    """The keyword arguments of `uvicorn.Config` (or `uvicorn.run`) that enforce `limits` on
    connections: the header deadline, and `max_connections` (uvicorn answers a request that
    arrives over it 503 and closes its connection). HTTP is parsed by h11, whatever else is
    installed."""
    protocol = type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": limits.header_timeout_s})
    # uvicorn counts the asking connection among the open ones: one more lets max_connections be served
    return {"http": protocol, "limit_concurrency": limits.max_connections + 1}


def raise_open_file_limit(max_connections: int) -> None:
    """Lift the process's soft limit on open files (as Go's runtime does) so that `max_connections`
    fit under it: past it new connections wait unaccepted, and a request over the connection limit
    gets no 503 but a timeout."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FILES_BESIDES_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        logger.warning("--max-connections %d needs about %d open files, but the limit is %d (ulimit -n): connections "
                       "past it wait unanswered; lower --max-connections or raise the limit", max_connections, wanted, hard)
