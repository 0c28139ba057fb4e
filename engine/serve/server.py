"""Starting the server: the index and model loaded once, the socket bound, uvicorn serving until Ctrl-C."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from ..model.load import LoadedModel
from .app import create_app
from .reference import ReferencePopulation, load_reference
from .scorer import IndexScorer
from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What a server answers with: the scorer (index + model) and the reference population."""

    scorer: IndexScorer
    reference: ReferencePopulation | None

    def app(self, settings: ServeSettings):
        return create_app(settings, self.scorer, self.reference)


def load(settings: ServeSettings, model: LoadedModel | None = None) -> Loaded:
    scorer = IndexScorer(settings, model)
    try:
        reference = (load_reference(settings.reference, settings.reference_labels, scorer.index)
                     if settings.reference is not None else None)
    except BaseException:
        scorer.close()
        raise
    return Loaded(scorer, reference)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or InputError in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r} does not resolve ({e.strerror}); give an address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by every accepted connection: without it a kept-alive connection's answer waits ~40 ms for
    # the client's delayed ACK (Nagle), measured on loopback as 44 ms per /api/health instead of 2 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    return sock


def serve(settings: ServeSettings, on_ready: Callable[[str], None] = print) -> None:
    """Load, bind, and serve until interrupted."""
    import uvicorn

    if not settings.loopback_only:
        log.warning("serve: listening on %s, which other machines can reach; the page has no login, and anyone "
                    "who reaches it can ask about any name", settings.host)
    sock = bind(settings.host, settings.port)
    try:
        loaded = load(settings)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(loaded.app(settings), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    on_ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}/")
    try:
        server.run(sockets=[sock])
    finally:
        loaded.scorer.close()
        sock.close()
