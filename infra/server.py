"""The OpenAI-compatible endpoint of `python sample.py --serve`: POST /v1/chat/completions (plain or
streamed as server-sent events) and GET /v1/models, over sample.py's Generator. Every request gets
an HTTP answer with a JSON body, refused ones an OpenAI-style error naming the field; the requests
that arrive together are decoded together, a new one joining the running batch at the next step.

Read top to bottom: a request's checks; the handler (a thread per connection); the Scheduler (the
one thread that runs the model); the server. The generator is passed in (make_server): the package
imports no stage but model and data.
"""

import collections
import json
import math
import queue
import re
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from infra.generation import Completion, Request, TextStream
from infra.records import BadInput, Message


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def parse_messages(messages) -> tuple[list[Message], str | None]:
    """Reads OpenAI chat messages as (user and assistant turns ending with a user turn, system
    prompt)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")):
            raise RequestError(f"messages[{i}] needs a role (system, user, assistant) and a string "
                               f"content", "messages")
        if m["role"] == "system":
            if i:
                raise RequestError("a system message must come first", "messages")
            system = m["content"]
        else:
            turns.append(Message(m["role"], m["content"]))
    if not turns or turns[-1].role != "user":
        raise RequestError("the last message must be the user's", "messages")
    return turns, system


REQUEST_FIELDS = {"model": str, "messages": list, "max_tokens": int, "max_completion_tokens": int,
                  "temperature": (int, float), "top_p": (int, float), "top_k": int, "seed": int,
                  "stream": bool, "stream_options": dict, "stop": (str, list), "condition": str,
                  "n": int}


def check_request(body, gen) -> dict:
    """Returns the generation settings of a chat completion request, or RequestError naming the
    field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, kind in REQUEST_FIELDS.items():
        value = body.get(key)
        wrong_bool = isinstance(value, bool) and kind is not bool
        if value is not None and (not isinstance(value, kind) or wrong_bool):
            raise RequestError(f"'{key}' has the wrong type", key)
    messages, system = parse_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if max_tokens <= 0:
        raise RequestError("'max_tokens' must be positive", "max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    temperature = body.get("temperature", 0)
    top_p = body.get("top_p", 1)
    top_k = body.get("top_k", 0)
    if not (0 <= temperature < math.inf and 0 < top_p <= 1 and top_k >= 0):  # NaN fails them all
        raise RequestError("temperature must be finite and >= 0, top_p in (0, 1], top_k >= 0")
    if not 0 <= body.get("seed", 0) < 2**63:
        raise RequestError("'seed' must be in [0, 2**63)", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(t, str) and t for t in stop):
        raise RequestError("'stop' is a string or a list of at most 4 non-empty strings", "stop")
    usage = (body.get("stream_options") or {}).get("include_usage", False)
    if not isinstance(usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options")
    try:
        prompt = gen.prompt_ids(messages, body.get("condition"), system)
    except BadInput as e:  # a lone surrogate in a message
        raise RequestError(str(e), "messages") from None
    except ValueError as e:  # a condition the model was not trained with
        raise RequestError(str(e), "condition") from None
    if len(prompt) >= gen.model.config.max_seq_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens; the context holds "
                           f"{gen.model.config.max_seq_len}", "messages")
    return dict(prompt=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k, seed=body.get("seed", 0), stop=tuple(stop),
                stream=body.get("stream", False), stream_usage=usage)


MAX_BODY = 4 * 2**20  # bytes: a chat request is far smaller; a larger one is refused unread


class Handler(BaseHTTPRequestHandler):
    """Every request gets an HTTP answer with a JSON body (a stream: an error event and [DONE]),
    whatever is wrong with it, and the server goes on serving. make_server binds a Generator and
    the Scheduler that runs it."""
    gen = None  # sample.py's Generator
    scheduler: "Scheduler"
    protocol_version = "HTTP/1.1"
    # A garbled request line gets a status line too (HTTP/0.9 has none).
    default_request_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may stay silent: an idle client does not hold a thread
    routes = {"/v1/models": "GET", "/v1/chat/completions": "POST"}

    def route(self):
        path = self.path.split("?")[0].rstrip("/")
        if path not in self.routes:
            return self.send_json(404, error_body(f"no route {self.path}", "not_found_error"))
        if self.command != self.routes[path]:
            return self.send_json(
                405, error_body(f"{path} takes {self.routes[path]}, not {self.command}"),
                {"Allow": self.routes[path]})
        self.answered = False
        try:
            self.list_models() if path == "/v1/models" else self.chat_completion()
        except RequestError as e:
            if e.status == 503:  # the server is full: the client may try again
                return self.send_json(503, error_body(str(e), "server_error"), {"Retry-After": "1"})
            self.send_json(e.status, error_body(str(e), param=e.param))
        except Exception as e:  # a fault of ours: said, logged, and the server goes on
            self.log_error("%s failed: %r", path, e)
            if not self.answered:
                self.send_json(500, error_body(f"server error: {e}", "server_error"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def list_models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": self.gen.name, "object": "model", "created": 0, "owned_by": "crlft"}]})

    def chat_completion(self):
        request = check_request(self.read_json_body(), self.gen)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        settings = {k: request[k]
                    for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")}
        if request["stream"]:
            return self.stream(request["prompt"], settings, reply_id, created,
                               request["stream_usage"])
        outcome = queue.SimpleQueue()
        self.scheduler.submit(Request(request["prompt"], **settings, on_done=outcome.put))
        done = outcome.get()
        if isinstance(done, Exception):
            raise done
        self.send_json(200, {
            "id": reply_id, "object": "chat.completion", "created": created, "model": self.gen.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason}],
            "usage": usage_of(done)})

    def read_json_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a JSON body with its Content-Length is required", status=411)
        if not re.fullmatch(r"[0-9]+", length):
            raise RequestError(f"Content-Length {length!r} is not a number of bytes")
        if int(length) > MAX_BODY:
            raise RequestError(f"the body is {int(length):,} bytes; at most {MAX_BODY:,}",
                               status=413)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {self.timeout} s",
                               status=408) from None
        try:
            return json.loads(raw)  # bytes: invalid UTF-8 raises too
        except (ValueError, RecursionError) as e:
            raise RequestError(f"malformed JSON: {str(e) or 'nested too deeply'}") from None

    def stream(self, prompt, settings, reply_id, created, usage: bool):
        """Streams the answer as server-sent events: a role chunk, content chunks as tokens come, a
        finish chunk (with `usage`, stream_options.include_usage: then a chunk of the token counts),
        [DONE]; a generation that fails ends with an error event, then [DONE]. A client that goes
        away frees its row at the next decoding step."""
        events = queue.SimpleQueue()  # the tokens as they come, then the Completion or the error
        request = Request(prompt, **settings, on_token=events.put, on_done=events.put)
        self.scheduler.submit(request)  # refused (503) before any of the stream is sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.answered = True
        self.close_connection = True

        def send(payload: dict):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        head = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                "model": self.gen.name}

        def event(delta, finish_reason=None):
            send({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                  **({"usage": None} if usage else {})})

        try:
            event({"role": "assistant", "content": ""})
            streamed = TextStream(self.gen.tokenizer, lambda text: event({"content": text}),
                                  settings["stop"])
            while isinstance(item := events.get(), int):
                streamed(0, item)
            if isinstance(item, Exception):
                self.log_error("generation failed: %r", item)
                send(error_body(f"generation failed: {item}", "server_error"))
            else:
                if item.text != streamed.sent:  # the rest: a character cut short, a held-back tail
                    event({"content": item.text[len(streamed.sent):]})
                event({}, item.finish_reason)
                if usage:
                    send({**head, "choices": [], "usage": usage_of(item)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError as e:  # the client closed the connection, or stopped reading for `timeout`
            request.cancelled = True
            self.log_error("stream cut short (%r): its row is freed", e)

    def send_json(self, status: int, body: dict, headers: dict | None = None):
        payload = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.answered = True
        # After a refusal the body may be unread: the connection cannot carry another request.
        self.close_connection |= status >= 400

    def send_error(self, code, message=None, explain=None):
        """Sends http.server's own answers (a bad request line, headers too long, HEAD) in JSON too.
        """
        self.send_json(code, error_body(message or HTTPStatus(code).phrase))

    def log_message(self, format, *args):
        print(f"{self.address_string()} {format % args}", file=sys.stderr)


def usage_of(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
            "total_tokens": done.prompt_tokens + len(done.tokens)}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


class Scheduler:
    """The one thread that runs the model for the server. Requests wait in a queue and join the
    running batch at the next decoding step, as rows free up: at most max_batch rows decode
    together, at most max_waiting requests wait (beyond, a 503). Only this thread runs the model:
    CUDA graphs recorded by --compile (reduce-overhead) belong to the thread that recorded them.
    A greedy answer is the one its prompt gets alone (tested on a CPU in float32); on a GPU a
    batch's matmuls may take other kernels than one row's, summing in another order, so in bf16 a
    near-tie between two tokens can break the other way."""

    def __init__(self, gen, max_batch: int, max_waiting: int):
        self.gen = gen
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.waiting = collections.deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, request: Request):
        with self.wakeup:
            if len(self.waiting) >= self.max_waiting:
                raise RequestError(f"the server is full ({self.max_batch} being answered, "
                                   f"{len(self.waiting)} waiting); try again shortly", status=503)
            self.waiting.append(request)
            self.wakeup.notify()

    def run(self):
        while True:
            with self.wakeup:
                while not (self.waiting or self.gen.running() or self.stopping):
                    self.wakeup.wait()
                if self.stopping:
                    break
                free = self.max_batch - len(self.gen.running())
                joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            self.decode([r for r in joining if not r.cancelled])
        self.fail([*self.waiting, *self.gen.running()], RuntimeError("the server stopped"))

    def decode(self, joining: list[Request]):
        """Decodes one step of the batch, the joining requests' prefill first. A failure fails every
        request in the batch (each is told), and the server goes on with the next."""
        try:
            if joining:
                self.gen.prefill(joining)
            self.gen.decode_step()
        except Exception as e:
            self.fail([*joining, *self.gen.running()], e)

    def fail(self, requests: list[Request], error: Exception):
        self.gen.release(requests)
        for r in dict.fromkeys(requests):
            r.on_done(error)

    def stop(self):
        """Ends the thread after the step it is in; the requests still there fail."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()


def make_server(gen, host: str, port: int, max_batch: int = 32,
                max_waiting: int = 256) -> ThreadingHTTPServer:
    """Makes the server: a thread per connection, and one Scheduler thread that decodes the requests
    together."""
    bound = type("Handler", (Handler,), {"gen": gen,
                                          "scheduler": Scheduler(gen, max_batch, max_waiting)})
    return Server((host, port), bound)


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog (socketserver's 5 makes a burst of clients wait)

    def server_close(self):
        super().server_close()
        self.RequestHandlerClass.scheduler.stop()
