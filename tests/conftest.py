import pytest

from server.app import create_app
from server.config import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import ThreadedServer


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    srv = ThreadedServer(fake).start()
    fake.url = srv.url
    yield fake
    srv.stop()


@pytest.fixture
def make_upstream():
    servers = []

    def make(**kw):
        fake = FakeUpstream(**kw)
        srv = ThreadedServer(fake).start()
        fake.url = srv.url
        servers.append(srv)
        return fake

    yield make
    for s in servers:
        s.stop()


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
