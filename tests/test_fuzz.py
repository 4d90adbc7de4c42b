"""Generated malformed and hostile input (hypothesis) for records.py's readers and sample.py's HTTP server.

records.py: files mixing good records with bad ones of every kind (types, encodings, sizes, nesting, syntax),
as JSONL and as JSON arrays, with and without a byte order mark. Under --skip-bad every good record is kept
and every bad one counted once; nothing raises. The server: raw requests with any method, path, headers and
body. Each gets an HTTP answer, a JSON error body when it is refused (a stream: an error event, then
[DONE]), and the server answers a normal request after it."""

import json
import math
import socket
import threading
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
from infra import records
from conftest import MISTRAL_TOKENIZER
from model import ModelConfig, Transformer
from infra.server import make_server
from sample import Generator

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------
# records.py's readers

# A message's text with something visible in it (records.checked_text refuses one with nothing to see).
text = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30).filter(
    lambda t: any(c.isprintable() and not c.isspace() for c in t))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=8)


@st.composite
def good_record(draw):
    turns = draw(st.lists(st.tuples(text, text), min_size=1, max_size=3))
    if draw(st.booleans()):
        return {"conversations": [t for q, a in turns for t in ({"from": "human", "value": q},
                                                               {"from": "gpt", "value": a})]}
    return {"items": [m for q, a in turns for m in ({"role": "user", "content": q},
                                                    {"role": "assistant", "content": a,
                                                     "weight": draw(st.floats(0, 2))})],
            "system": draw(text)}


def as_bytes(record) -> bytes:
    return json.dumps(record).encode()  # ensure_ascii: a lone surrogate is written as the escape \udcxx


@st.composite
def bad_record(draw, jsonl: bool) -> bytes:
    """One record records.py must refuse: valid JSON of the wrong shape, or (JSONL only) not JSON at all."""
    good = draw(good_record())
    openchat = "items" in good
    messages = good["items"] if openchat else good["conversations"]
    key = "content" if openchat else "value"
    kinds = ["not an object", "no conversation key", "wrong type", "surrogate", "empty message",
             "unknown role", "no messages", "huge integer", "invalid utf-8"]
    kinds += ["bad weight", "surrogate system"] if openchat else []
    kinds += ["not json", "deep nesting"] if jsonl else []
    kind = draw(st.sampled_from(kinds))
    m = draw(st.integers(0, len(messages) - 1))
    if kind == "not an object":
        return as_bytes(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    if kind == "no conversation key":
        return as_bytes(draw(st.dictionaries(st.sampled_from(["messages", "text", "turns"]), json_values)))
    if kind == "wrong type":
        messages[m][key] = draw(json_values.filter(lambda v: not isinstance(v, str)))
    elif kind == "surrogate":
        messages[m][key] += chr(draw(st.integers(0xD800, 0xDFFF)))
    elif kind == "surrogate system":
        good["system"] = chr(draw(st.integers(0xD800, 0xDFFF)))
    elif kind == "empty message":
        messages[m][key] = draw(st.sampled_from(["", " ", "\n\t"]))
    elif kind == "unknown role":
        messages[m]["role" if openchat else "from"] = draw(text.filter(lambda r: r not in records.SHAREGPT_ROLES))
    elif kind == "no messages":
        messages.clear()
    elif kind == "bad weight":
        messages[1]["weight"] = draw(st.sampled_from([-1.0, math.nan, math.inf, "1"]))
    elif kind == "huge integer":  # a message's text replaced by an integer longer than Python converts
        messages[m][key] = "HUGE"
        return as_bytes(good).replace(b'"HUGE"', b"1" + b"0" * draw(st.integers(4300, 6000)))
    elif kind == "invalid utf-8":
        raw = as_bytes(good)
        at = raw.index(b'"' + key.encode() + b'": "') + len(key) + 5
        return raw[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + raw[at:]
    elif kind == "not json":
        return b"{" + draw(st.text(max_size=20).filter(lambda t: "\n" not in t and "\r" not in t)).encode()
    elif kind == "deep nesting":
        depth = draw(st.integers(5_000, 20_000))
        return b"[" * depth + b"]" * depth
    return as_bytes(good)


@st.composite
def mixed_file(draw, jsonl: bool):
    """(file bytes, good records, bad records)."""
    entries = draw(st.lists(st.one_of(good_record().map(as_bytes).map(lambda b: (b, True)),
                                      bad_record(jsonl).map(lambda b: (b, False))), min_size=1, max_size=8))
    body = b"\n".join(e for e, _ in entries) if jsonl else b"[\n" + b",\n".join(e for e, _ in entries) + b"\n]"
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + body, sum(ok for _, ok in entries), sum(not ok for _, ok in entries)


def read_with_skip_bad(tmp, content: bytes, name: str):
    path = tmp / name
    path.write_bytes(content)
    counts = Counter()
    conversations = records.read_conversations([records.Source("GPT4", 1.0, [path])], skip_bad=True, counts=counts)
    bad = sum(counts[reason] for reason in records.BAD_REASONS)
    return conversations, bad


@pytest.mark.parametrize("jsonl", [True, False], ids=["jsonl", "json-array"])
def test_every_good_record_is_kept_and_every_bad_one_counted(tmp_path_factory, jsonl):
    tmp = tmp_path_factory.mktemp("fuzz")

    @FUZZ
    @given(mixed_file(jsonl))
    def check(case):
        content, n_good, n_bad = case
        conversations, bad = read_with_skip_bad(tmp, content, "chat.jsonl" if jsonl else "chat.json")
        assert (len(conversations), bad) == (n_good, n_bad)

    check()


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_give_records_counts_or_a_named_error(tmp_path_factory, content):
    tmp = tmp_path_factory.mktemp("bytes", numbered=True)
    try:
        read_with_skip_bad(tmp, content, "chat.json")
    except records.UnreadableFile as e:
        assert str(e).startswith(str(tmp / "chat.json"))


# ---------------------------------------------------------------------------------------------------------
# The HTTP server


@pytest.fixture(scope="module")
def server():
    """A random tiny model behind the real server on loopback, trained on the conditions GPT4 and GPT3."""
    torch.manual_seed(0)
    tokenizer = data.Tokenizer(MISTRAL_TOKENIZER, "openchat_v3.2")
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    gen = Generator(model, tokenizer, "GPT4", "fuzz", conditions=["GPT4", "GPT3"])
    httpd = make_server(gen, "127.0.0.1", 0)
    httpd.RequestHandlerClass.timeout = 2  # seconds: the idle-connection test does not wait a minute
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()
    httpd.server_close()


def exchange(port, raw: bytes, timeout=30) -> bytes:
    """Sends raw bytes, reads until the server closes the connection (every error answer closes it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def post(body: bytes, path="/v1/chat/completions", method="POST", length: str | None = None) -> bytes:
    length = str(len(body)) if length is None else length
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def parse(reply: bytes) -> tuple[int, dict, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_answered(reply: bytes):
    """A status line; a refusal has a JSON error body; a stream ends with [DONE]."""
    status, headers, body = parse(reply)
    if headers.get("Content-Type") == "text/event-stream":
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        return status
    assert headers["Content-Type"] == "application/json"
    reply_json = json.loads(body)
    assert (status == 200) == ("error" not in reply_json), (status, reply_json)
    return status


def assert_still_serving(port):
    request = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    status, _, body = parse(exchange(port, post(json.dumps(request).encode())))
    assert status == 200 and json.loads(body)["object"] == "chat.completion"


HOSTILE = {  # each kind the review found unanswered or answered wrong, and its status
    "lone surrogate in content": (post(b'{"messages": [{"role": "user", "content": "\\udcff"}]}'), 400),
    "lone surrogate in condition": (post(b'{"messages": [{"role": "user", "content": "hi"}], '
                                         b'"condition": "\\ud800"}'), 400),
    "lone surrogate in system": (post(b'{"messages": [{"role": "system", "content": "\\udfff"}, '
                                      b'{"role": "user", "content": "hi"}]}'), 400),
    "invalid UTF-8 body": (post(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'), 400),
    "JSON nested 100,000 deep": (post(b"[" * 100_000 + b"]" * 100_000), 400),
    "Content-Length abc": (post(b"{}", length="abc"), 400),
    "Content-Length -1": (post(b"{}", length="-1"), 400),
    "no Content-Length": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    "a body over the limit": (post(b"", length=str(10**9)), 413),
    "temperature NaN": (post(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'), 400),
    "temperature NaN, streamed": (post(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN, '
                                       b'"stream": true}'), 400),
    "seed 2**70": (post(json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}).encode()), 400),
    "an unknown condition": (post(b'{"messages": [{"role": "user", "content": "hi"}], "condition": "GPT5"}'), 400),
    "GET on the POST path": (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "PUT": (post(b"{}", method="PUT"), 405),
    "OPTIONS": (b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "an unknown method": (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    "a malformed request line": (b"GARBAGE\r\n\r\n", 400),
    "an unknown path": (post(b"{}", path="/v2/everything"), 404),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_each_hostile_request_gets_its_json_error_and_the_server_goes_on(server, case):
    raw, status = HOSTILE[case]
    reply = exchange(server, raw)
    assert parse(reply)[0] == status and assert_answered(reply) == status
    assert_still_serving(server)


def test_a_stalled_body_is_answered_408_when_the_socket_times_out(server):
    with socket.create_connection(("127.0.0.1", server), timeout=30) as s:
        s.sendall(post(b'{"messages": []}', length="100"))  # promises 100 bytes, sends 16, then nothing
        reply = b"".join(iter(lambda: s.recv(65536), b""))  # until the server closes
    assert parse(reply)[0] == 408 and assert_answered(reply) == 408
    assert_still_serving(server)


class FailingGenerator(Generator):
    """A fault injected where generation runs, to see what the client gets."""

    def prefill(self, requests):
        raise RuntimeError("injected fault")


def test_a_failing_generation_is_a_500_or_a_stream_ending_with_an_error_event_and_done():
    tokenizer = data.Tokenizer(MISTRAL_TOKENIZER, "openchat_v3.2")
    gen = FailingGenerator(Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)), tokenizer,
                           "GPT4", "failing")
    httpd = make_server(gen, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        request = {"messages": [{"role": "user", "content": "hi"}]}
        status, _, body = parse(exchange(httpd.server_port, post(json.dumps(request).encode())))
        assert status == 500 and "injected fault" in json.loads(body)["error"]["message"]
        reply = exchange(httpd.server_port, post(json.dumps({**request, "stream": True}).encode()))
        events = [e.removeprefix(b"data: ") for e in parse(reply)[2].split(b"\n\n") if e]
        assert b"injected fault" in events[-2] and "error" in json.loads(events[-2]) and events[-1] == b"[DONE]"
    finally:
        httpd.shutdown()
        httpd.server_close()


request_values = st.one_of(json_values, st.integers(-5, 8), st.floats(allow_nan=True), st.text(max_size=5))
requests = st.fixed_dictionaries({}, optional={
    "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "robot"]),
         "content": st.one_of(st.text(max_size=20), json_values)}), max_size=3)),
    "max_tokens": st.integers(-3, 4), "temperature": request_values, "top_p": request_values,
    "top_k": request_values, "seed": st.one_of(st.integers(-2**70, 2**70), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(json_values, st.fixed_dictionaries({}, optional={"include_usage": json_values})),
    "stop": st.one_of(json_values, st.lists(st.text(max_size=3), max_size=5)),
    "condition": st.sampled_from(["GPT4", "GPT3", "", "x"]),
    "n": st.integers(0, 2)})


@FUZZ
@given(st.one_of(requests.map(lambda r: json.dumps(r).encode()), st.binary(max_size=100)))
def test_generated_requests_are_answered_and_the_server_goes_on(server, body):
    assert assert_answered(exchange(server, post(body))) in (200, 400)
    assert_still_serving(server)
