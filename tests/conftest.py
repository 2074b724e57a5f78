import pytest

from server.app import create_app
from server.config import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import ThreadedServer


def pytest_collection_modifyitems(config, items):
    """Modules that start vLLM engines of their own run last, after everything that shares the session's
    engine (tests/integration/conftest.py), so that engine is started once and never runs beside theirs."""
    items.sort(key=lambda item: item.get_closest_marker("own_engine") is not None)  # stable: order kept


@pytest.fixture
def serve_app():
    """serve_app(app) runs an ASGI app (a fake engine) on a loopback port, sets app.url, returns app."""
    servers = []

    def serve(app):
        srv = ThreadedServer(app).start()
        app.url = srv.url
        servers.append(srv)
        return app

    yield serve
    for s in servers:
        s.stop()


@pytest.fixture
def upstream(serve_app):
    return serve_app(FakeUpstream())


@pytest.fixture
def make_upstream(serve_app):
    return lambda **kw: serve_app(FakeUpstream(**kw))


@pytest.fixture
def make_gateway():
    servers = []

    def make(engines, **kw):
        kw.setdefault("health_interval", 0.2)
        settings = Settings(engines=engines, **kw)
        app = create_app(settings)
        srv = ThreadedServer(app).start()
        srv.app = app
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()
