import pytest

from server.app import create_app
from server.config import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import ThreadedServer


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by fixture parameters
def pytest_collection_modifyitems(config, items):
    """One vLLM engine at a time (tests/integration/conftest.py): first the tests that share the session's
    engine, then the modules that start engines of their own (which stop the shared one first), then
    everything else, with no engine of ours running beside it. Stable: the order within a group is kept."""
    def group(item):
        if "served" in item.fixturenames:
            return 0
        return 1 if item.get_closest_marker("own_engine") is not None else 2
    items.sort(key=group)


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
        srv = ThreadedServer(app, http=app.state.http_protocol).start()
        srv.app = app
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()
