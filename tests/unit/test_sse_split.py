"""server/sse.py: events split across arbitrary chunk boundaries, and their classification."""
from server.sse import DONE_EVENT, OTHER, TOKEN, USAGE, EventSplitter, classify

TOKEN_EV = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}'
USAGE_EV = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
STREAM = TOKEN_EV + b"\n\n" + b": keep-alive\r\n\r\n\n\n" + USAGE_EV + b"\n\ndata: [DONE]\n\n"


def test_every_chunking_gives_the_same_events():
    want = [TOKEN_EV, b": keep-alive", USAGE_EV, b"data: [DONE]"]
    for size in (1, 2, 3, 7, 64, len(STREAM)):
        s = EventSplitter()
        got = [ev for i in range(0, len(STREAM), size) for ev in s.feed(STREAM[i:i + size])]
        assert got == want, size
        assert s.rest == b""


def test_an_incomplete_event_waits_for_its_end():
    s = EventSplitter()
    assert s.feed(TOKEN_EV[:10]) == []
    assert s.feed(TOKEN_EV[10:] + b"\n") == []
    assert s.feed(b"\ndata: [DO") == [TOKEN_EV]
    assert s.rest == b"data: [DO"


def test_classify():
    assert [classify(e) for e in (TOKEN_EV, USAGE_EV, b"data: [DONE]", b": keep-alive")] == \
        [TOKEN, USAGE, DONE_EVENT, OTHER]
