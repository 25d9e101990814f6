"""OpenAI-compatible HTTP server over one AsyncEngine (or data-parallel replicas behind a
router): the app factory and `serve`.

`create_app` builds the FastAPI app (routes, error handlers, API key and body-size guards);
`serve` runs it with uvicorn while the model loads in the background, so /health can say 503
until it is ready, and on SIGTERM drains: new requests get 503, running ones finish for up to
`shutdown_timeout` seconds, the rest are aborted, and the process exits 0.

The server's parts: routes.py (endpoints), convert.py (OpenAI <-> engine), streaming.py (SSE and
whole answers), errors.py (error bodies, auth, body size), state.py (config and shared state),
static/ (the playground page at `/`: plain HTML, CSS and JS that call the endpoints above).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from nanoinfer.config import EngineConfig
from nanoinfer.engine.data_parallel import build_replicas
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import ModelLoadError
from nanoinfer.server.errors import APIKeyMiddleware, BodySizeMiddleware, install_error_handlers
from nanoinfer.server.routes import api_router, open_router
from nanoinfer.server.state import ServerConfig, ServerState

log = logging.getLogger("nanoinfer.server")

STATIC_DIR = Path(__file__).parent / "static"
# The page may load nothing but our own files and talk to nothing but this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class _StaticFiles(StaticFiles):
    """The playground's files, revalidated on every load: an upgraded package never runs old JS."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _add_playground(app: FastAPI) -> None:
    """GET / is the playground page, /static/ its files; neither needs the API key (errors.py)."""
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)


def create_app(
    engine: LLMEngine | Sequence[LLMEngine] | None,
    config: ServerConfig,
    loader: Callable[[], LLMEngine | Sequence[LLMEngine]] | None = None,
) -> FastAPI:
    """The HTTP app over `engine` (or replicas of one, data-parallel), or over what `loader`
    returns, loaded in a thread at startup."""
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            state.attach(engine)
        elif loader is not None:
            threading.Thread(target=state.load, args=(loader,), name="nanoinfer-loader", daemon=True).start()
        yield
        state.shutdown()

    app = FastAPI(title="nanoinfer", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(open_router())
    app.include_router(api_router())
    _add_playground(app)
    app.add_middleware(APIKeyMiddleware, api_key=config.api_key or None)
    app.add_middleware(BodySizeMiddleware, max_bytes=config.max_request_bytes)
    return app


def _uvicorn_server(app: FastAPI, config: ServerConfig):  # -> uvicorn.Server (imported lazily)
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """The first SIGTERM/SIGINT drains (see ServerState.drain); a second one exits at once."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state: ServerState = app.state.server
            if state.draining:
                super().handle_exit(sig, frame)
                return
            log.info("shutting down: draining for up to %g s", config.shutdown_timeout)
            state.draining = True  # before the thread starts: no request slips in meanwhile
            threading.Thread(target=self._drain_then_exit, args=(state,), daemon=True).start()

        def _drain_then_exit(self, state: ServerState) -> None:
            try:
                state.drain(config.shutdown_timeout)
            finally:
                self.should_exit = True  # not the signal: uvicorn would re-raise it and exit non-zero

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
    return DrainingServer(uv_config)


def serve(config: ServerConfig, engine_config: EngineConfig) -> None:
    """`nanoinfer serve`: answer HTTP at once, load the model meanwhile; raise if loading fails."""
    server = None

    def load() -> LLMEngine | list[LLMEngine]:
        try:
            if engine_config.data_parallel_size > 1:
                return build_replicas(config.model, engine_config)
            return LLMEngine(config.model, engine_config)
        except Exception:
            if server is not None:
                server.should_exit = True  # a server that can never answer should not linger
            raise

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # uvicorn's look
    app = create_app(None, config, loader=load)
    server = _uvicorn_server(app, config)
    server.run()
    error = app.state.server.load_error
    if error:
        raise ModelLoadError(f"cannot serve {config.model}: {error}")


__all__ = ["ServerConfig", "ServerState", "create_app", "serve"]
