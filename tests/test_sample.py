"""sample.py on a model trained by train.py: KV-cache decoding against full forward passes, batched against
one by one, the stop at the end of a turn, and the HTTP endpoint with a real client on loopback."""

import http.client
import json
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import data
from conftest import MISTRAL_TOKENIZER, ROOT
from demo import DemoConfig, make_demo
from infra.hf import load_pretrained
from model import ModelConfig, Transformer
from infra.records import Message
from infra.generation import Request
from infra.server import Scheduler, make_server
from sample import Generator, SampleConfig, fit_history, sample

PROMPTS = ["Sort these numbers from smallest to largest: 12 9 3", "Put these numbers in ascending order: 5 1 77 40",
           "Sort in increasing order: 3 2 1 60 8", "Please order from lowest to highest: 41 7"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model trained for a few seconds on the demo task: enough to answer and to end its turns."""
    tmp = tmp_path_factory.mktemp("sample")
    make_demo(DemoConfig(out=str(tmp / "demo"), conversations=240, holdout_prompts=20, validation_prompts=20,
                         base_documents=200, vocab_size=420, seed=1))
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--data={tmp / 'demo' / 'dataset'}",
                          "--base=", f"--out={tmp / 'run'}", "--model=tiny", "--lr=3e-3", "--epochs=4", "--batch-max-len=256"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "run" / "exports" / "epoch-4"


@pytest.fixture(scope="module")
def gen(export):
    return Generator.load(export, device="cpu")


def prompts_of(gen, texts, condition=None):
    return [gen.prompt_ids([Message("user", t)], condition) for t in texts]


def greedy_by_full_forward(model, prompt, max_new_tokens, eot):
    """The reference: the whole sequence through the model again for every new token, no cache."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([tokens]))[0, -1].argmax())
            if token == eot:
                break
            tokens.append(token)
    return tokens[len(prompt):]


def test_kv_cache_decoding_equals_greedy_decoding_by_full_forward_passes(gen, export):
    reference = load_pretrained(export).eval()
    history = [Message("user", PROMPTS[0]), Message("assistant", "3 9 12"), Message("user", PROMPTS[1])]
    prompts = prompts_of(gen, PROMPTS) + [gen.prompt_ids(history)]
    for prompt in prompts:
        [done] = gen.generate([prompt], max_new_tokens=24)
        assert done.tokens == greedy_by_full_forward(reference, prompt, 24, gen.tokenizer.eot_id)


def test_batched_generation_equals_one_by_one(gen):
    prompts = prompts_of(gen, PROMPTS) + prompts_of(gen, PROMPTS[:2], condition="GPT3")
    together = gen.generate(prompts, max_new_tokens=24)
    alone = [gen.generate([p], max_new_tokens=24)[0] for p in prompts]
    assert [(c.tokens, c.finish_reason) for c in together] == [(c.tokens, c.finish_reason) for c in alone]


def test_a_row_cut_short_by_the_context_decodes_alongside_longer_answers(gen):
    context = gen.model.config.max_seq_len
    sevens = 1
    while len(gen.prompt_ids([Message("user", "Sort: " + "7 " * (sevens + 1))])) <= context - 2:
        sevens += 1
    long_prompt = gen.prompt_ids([Message("user", "Sort: " + "7 " * sevens)])  # room for 1 or 2 tokens
    prompts = prompts_of(gen, PROMPTS[:2]) + [long_prompt]
    together = gen.generate(prompts, max_new_tokens=300)
    alone = [gen.generate([p], max_new_tokens=300)[0] for p in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert len(together[0].tokens) > 2 >= len(together[2].tokens)  # the others decode past its end


def test_generation_stops_at_the_end_of_the_turn_or_at_the_budget(gen):
    [done] = gen.generate(prompts_of(gen, PROMPTS[:1]), max_new_tokens=40)
    assert done.finish_reason == "stop" and 0 < len(done.tokens) < 40
    assert gen.tokenizer.eot_id not in done.tokens and done.text == gen.tokenizer.decode(done.tokens).strip()
    [cut] = gen.generate(prompts_of(gen, PROMPTS[:1]), max_new_tokens=1)
    assert cut.finish_reason == "length" and cut.tokens == done.tokens[:1]


def test_the_prompt_of_a_conversation_is_its_training_tokens_up_to_the_assistant_prefix(gen):
    history = [Message("user", PROMPTS[0]), Message("assistant", "3 9 12"), Message("user", PROMPTS[1])]
    prompt = gen.prompt_ids(history, system="Answer with numbers only.")
    trained, weights = data.tokenize_conversation(gen.tokenizer, history + [Message("assistant", "1 5 40 77")],
                                                  "GPT4", system="Answer with numbers only.")
    assert trained[:len(prompt)] == prompt and weights[len(prompt)] > 0  # the answer starts right after


def test_sampling_is_reproducible_for_a_seed_and_the_cutoffs_narrow_it(gen):
    prompts = prompts_of(gen, PROMPTS)
    settings = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    first = [c.tokens for c in gen.generate(prompts, seed=3, **settings)]
    assert first == [c.tokens for c in gen.generate(prompts, seed=3, **settings)]
    assert first != [c.tokens for c in gen.generate(prompts, seed=4, **settings)]
    logits = torch.randn(64, 100)
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 1.0, 1.0, 1, rng), logits.argmax(-1))  # top_k 1 is greedy
    assert torch.equal(sample(logits, 1.0, 1e-6, 0, rng), logits.argmax(-1))  # so is a vanishing top_p
    drawn = torch.stack([sample(logits, 1.0, 1.0, 5, rng) for _ in range(20)])
    assert (drawn[..., None] == torch.topk(logits, 5).indices).any(-1).all()  # never outside the top 5


def test_the_kv_cache_grows_in_a_few_sizes(export):
    """Longer prompts and larger batches grow the cache to the next power of two (at least 256 positions, at
    most the context of 512), not to each request's own size: a compiled decoding step meets few shapes."""
    gen = Generator.load(export, device="cpu")
    shapes = []
    for prompts, new_tokens in ((prompts_of(gen, PROMPTS[:1]), 4), (prompts_of(gen, PROMPTS[:3]), 4),
                                (prompts_of(gen, [" ".join(PROMPTS * 4)]), 4), (prompts_of(gen, PROMPTS[:2]), 4)):
        gen.generate(prompts, max_new_tokens=new_tokens)
        shapes.append(gen.cache_shape)
    assert 256 < len(prompts_of(gen, [" ".join(PROMPTS * 4)])[0]) < 508
    assert shapes == [(1, 256), (4, 256), (4, 512), (4, 512)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decoding_answers_as_eager_decoding_on_cuda(export):
    """--compile: the one-token step compiled with CUDA graphs (reduce-overhead) gives eager's greedy answers."""
    eager, compiled = Generator.load(export, device="cuda"), Generator.load(export, device="cuda", compile=True)
    prompts = prompts_of(eager, PROMPTS)
    for _ in range(2):  # the second call replays the recorded graphs
        assert [d.tokens for d in compiled.generate(prompts)] == [d.tokens for d in eager.generate(prompts)]


# ---------------------------------------------------------------------------------------------------------
# The HTTP endpoint


@pytest.fixture(scope="module")
def server(gen):
    httpd = make_server(gen, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()
    httpd.server_close()


def request(port, method, path, body=None, raw=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read().decode(), response.getheader("Content-Type")


def chat_body(text, **extra):
    return {"model": "x", "messages": [{"role": "user", "content": text}], **extra}


def test_the_endpoint_answers_plain_and_streaming_requests(gen, server):
    status, body, kind = request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[0]))
    reply = json.loads(body)
    [expected] = gen.generate(prompts_of(gen, PROMPTS[:1]))
    assert status == 200 and kind == "application/json" and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == len(expected.tokens)

    status, body, kind = request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[0], stream=True))
    events = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert answer_of(server, PROMPTS[0], stream=True) == expected.text
    assert status == 200 and kind == "text/event-stream" and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and len(chunks) > 3  # token by token

    _, body, _ = request(server, "POST", "/v1/chat/completions",
                         chat_body(PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == reply["usage"]

    status, body, _ = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["object"] == "model"


def test_every_generation_of_the_server_runs_on_one_thread(gen, server, monkeypatch):
    """CUDA graphs recorded by --compile belong to the thread that recorded them: plain and streaming
    requests, each on its own connection thread, are all prefilled and decoded on the server's one thread."""
    threads = []
    for name in ("prefill", "decode_step"):
        method = getattr(gen, name)
        monkeypatch.setattr(gen, name, lambda *a, method=method: threads.append(threading.get_ident()) or method(*a))
    for stream in (False, True, False):
        assert request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[1], stream=stream))[0] == 200
    assert len(threads) > 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_a_request_ends_at_its_own_stop_sequence_and_none_of_it_is_streamed(gen, server):
    """OpenAI's `stop`: the answer ends where one of the request's texts appears, without it; a stream holds
    back what may be the start of one (here " 9 1" spans several tokens), so none of it is ever sent."""
    [expected] = gen.generate(prompts_of(gen, PROMPTS[:1]))
    words = expected.text.split()  # numbers, e.g. "3 9 12"
    assert len(words) >= 3 and expected.finish_reason == "stop"
    spanning = f" {words[1]} {words[2][0]}"  # " 9 1"
    last = expected.text[-1]
    for stop, answer in ((spanning, words[0]), (["§", last], expected.text[:expected.text.index(last)].strip()),
                         ("§", expected.text)):
        _, body, _ = request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[0], stop=stop))
        choice = json.loads(body)["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (answer, "stop")
        _, body, _ = request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[0], stop=stop, stream=True))
        chunks = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_condition_field_changes_the_prompt(gen, server):
    for condition in ("GPT3", "GPT4"):
        _, body, _ = request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[2], condition=condition))
        [expected] = gen.generate(prompts_of(gen, PROMPTS[2:3], condition))
        assert json.loads(body)["choices"][0]["message"]["content"] == expected.text


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', None),
    "not an object": (b'[1, 2]', None),
    "messages of the wrong type": (json.dumps({"messages": "hi"}).encode(), "messages"),
    "a message without content": (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages"),
    "max_tokens of the wrong type": (json.dumps(chat_body("hi", max_tokens="5")).encode(), "max_tokens"),
    "max_tokens zero": (json.dumps(chat_body("hi", max_tokens=0)).encode(), "max_tokens"),
    "stream not a bool": (json.dumps(chat_body("hi", stream="yes")).encode(), "stream"),
    "stop not strings": (json.dumps(chat_body("hi", stop=["a", 1])).encode(), "stop"),
    "five stops": (json.dumps(chat_body("hi", stop=list("abcde"))).encode(), "stop"),
    "include_usage not a bool": (json.dumps(chat_body("hi", stream_options={"include_usage": 1})).encode(),
                                 "stream_options"),
    "ends with the assistant": (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),
                                "messages"),
    "longer than the context": (json.dumps(chat_body("9 " * 600)).encode(), "messages"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_400_with_an_openai_error_and_the_server_keeps_serving(server, case):
    raw, param = BAD_REQUESTS[case]
    status, body, _ = request(server, "POST", "/v1/chat/completions", raw=raw)
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert request(server, "POST", "/v1/chat/completions", chat_body(PROMPTS[1]))[0] == 200


def answer_of(port, text, stream):
    _, body, _ = request(port, "POST", "/v1/chat/completions", chat_body(text, stream=stream))
    if not stream:
        return json.loads(body)["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_concurrent_requests_queue_and_each_gets_its_own_answer(gen, server):
    expected = [c.text for c in gen.generate(prompts_of(gen, PROMPTS))]
    jobs = [(i, stream) for i in range(len(PROMPTS)) for stream in (False, True)]  # 8 requests at once
    answers = {}

    def ask(i, stream):
        answers[i, stream] = answer_of(server, PROMPTS[i], stream)

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {(i, stream): expected[i] for i, stream in jobs}


# ---------------------------------------------------------------------------------------------------------
# Requests decoded together


def serve(gen, **limits):
    httpd = make_server(gen, "127.0.0.1", 0, **limits)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def close(httpd):
    httpd.shutdown()
    httpd.server_close()  # its generation thread too


@pytest.mark.slow
def test_held_out_prompts_sent_at_once_get_the_answers_each_gets_alone(export):
    """The demo's 20 held-out prompts sent together to a server that decodes 4 at a time: requests join as
    rows free up, and every greedy answer is the one the prompt gets decoded alone."""
    gen = Generator.load(export, device="cpu")
    holdout = [json.loads(line)["prompt"] for line in (export.parents[2] / "demo" / "holdout.jsonl").open()]
    alone = [gen.generate([p])[0].text for p in prompts_of(gen, holdout)]
    steps = []
    step = gen.decode_step
    gen.decode_step = lambda: steps.append(len(gen.running())) or step()
    httpd = serve(gen, max_batch=4)
    answers = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, answer_of(httpd.server_port, holdout[i],
                                                                                    stream=i % 2 == 1)))
               for i in range(len(holdout))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close(httpd)
    assert [answers[i] for i in range(len(holdout))] == alone
    assert max(steps) == 4 and gen.cache_shape[0] == 4  # never more rows than the cap


@pytest.fixture(scope="module")
def random_gen():
    """A random tiny model (context 512): it seldom ends its turn, so its answers run to their budget."""
    torch.manual_seed(0)
    tokenizer = data.Tokenizer(MISTRAL_TOKENIZER, "openchat_v3.2")
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    return Generator(model, tokenizer, "GPT4", "random")


def test_a_request_joins_the_running_batch_at_the_next_step_with_its_own_settings(random_gen, monkeypatch):
    """A greedy request is decoding when a sampled one and one whose long prompt outgrows the KV cache arrive:
    both join at the next step beside it (the cache grows, keeping its rows), and each of the three answers as
    it does alone, the sampled one too (its own seed, temperature, top_k)."""
    gen = random_gen
    steps = []  # the requests running at each decoding step
    step = gen.decode_step
    monkeypatch.setattr(gen, "decode_step", lambda: steps.append(set(map(id, gen.running()))) or step())
    scheduler = Scheduler(gen, max_batch=4, max_waiting=4)
    long_prompt = gen.prompt_ids([Message("user", "Sort: " + "7 " * 140)])
    settings = {"first": dict(prompt=gen.prompt_ids([Message("user", "Hello")]), max_new_tokens=150),
                "sampled": dict(prompt=gen.prompt_ids([Message("user", "Sort: 3 1 2")]), max_new_tokens=30,
                                temperature=1.0, top_k=50, seed=7),
                "long": dict(prompt=long_prompt, max_new_tokens=20)}
    assert 256 < len(long_prompt) + 20 < 512
    outcomes, started = queue.SimpleQueue(), threading.Event()
    requests = {name: Request(**kwargs, on_done=outcomes.put) for name, kwargs in settings.items()}
    requests["first"].on_token = lambda _: len(requests["first"].tokens) >= 10 and started.set()
    scheduler.submit(requests["first"])
    assert started.wait(60)
    scheduler.submit(requests["sampled"])
    scheduler.submit(requests["long"])
    done = [outcomes.get(timeout=60) for _ in range(3)]
    scheduler.stop()
    assert done[-1] is requests["first"].completion  # the others finished while it decoded
    for name, kwargs in settings.items():
        kwargs = dict(kwargs)
        [alone] = gen.generate([kwargs.pop("prompt")], **kwargs)
        assert requests[name].completion.tokens == alone.tokens, name
    ids = {name: id(r) for name, r in requests.items()}
    together = [s for s in steps if s == set(ids.values())]
    # They joined while the first was decoding: its first token came from the prefill, the next nine from
    # steps 0-8, and they were sent after its tenth.
    assert together and steps.index(together[0]) >= 9 and steps[0] == {ids["first"]}
    assert gen.cache_shape[1] == 512


def wait_until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_server_answers_503_and_a_client_that_leaves_frees_its_row(random_gen, monkeypatch):
    """One row, one waiting place: a third request is refused with a 503 and Retry-After; a streaming client
    that closes its connection gives its row to the waiting request. Decoding steps wait on a gate until the
    refusal, so that the first request cannot end before."""
    gate, admitted = threading.Event(), []
    step, prefill = random_gen.decode_step, random_gen.prefill
    monkeypatch.setattr(random_gen, "decode_step", lambda: gate.wait(60) and step())
    monkeypatch.setattr(random_gen, "prefill", lambda requests: admitted.extend(requests) or prefill(requests))
    httpd = serve(random_gen, max_batch=1, max_waiting=1)
    scheduler = httpd.RequestHandlerClass.scheduler
    port = httpd.server_port
    body = json.dumps(chat_body("Hello", stream=True, max_tokens=400)).encode()
    streaming = socket.create_connection(("127.0.0.1", port), timeout=60)
    streaming.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until(random_gen.running)  # in the one row
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(
        zip(("status", "body"), request(port, "POST", "/v1/chat/completions", chat_body("Hi", max_tokens=5))[:2])))
    thread.start()
    wait_until(lambda: scheduler.waiting)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(chat_body("Hey")))
    refused = connection.getresponse()
    error = json.loads(refused.read())["error"]
    assert refused.status == 503 and refused.getheader("Retry-After") == "1"
    assert error["type"] == "server_error" and "1 waiting" in error["message"]
    streaming.close()  # the client leaves; its row goes to the waiting request
    gate.set()
    thread.join(60)
    assert waiting["status"] == 200 and json.loads(waiting["body"])["usage"]["completion_tokens"] == 5
    assert not random_gen.running() and not scheduler.waiting
    first = admitted[0]
    assert first.cancelled and first.completion is None and len(first.tokens) < 400  # cut short, not finished
    close(httpd)


# ---------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_one_prompt_a_file_of_prompts_and_a_chat_from_the_command_line(gen, export, tmp_path):
    [expected] = gen.generate(prompts_of(gen, PROMPTS[:1]))
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={export}", f"--prompt={PROMPTS[0]}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == expected.text

    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n"
                         + json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}], "condition": "GPT3"}))
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={export}", f"--input={questions}",
                          f"--output={tmp_path / 'answers.jsonl'}", "--batch-size=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    expected = gen.generate(prompts_of(gen, PROMPTS) + prompts_of(gen, PROMPTS[:1], "GPT3"))
    assert [a["answer"] for a in answers] == [c.text for c in expected]

    second = "Now these: 30 4 11"
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={export}"], cwd=ROOT,
                         input=f"{PROMPTS[0]}\n{second}\n\n", capture_output=True, text=True, timeout=300)
    first_reply = gen.generate(prompts_of(gen, PROMPTS[:1]))[0].text
    history = [Message("user", PROMPTS[0]), Message("assistant", first_reply), Message("user", second)]
    [second_reply] = gen.generate([gen.prompt_ids(history)])
    assert run.returncode == 0
    assert f"model> {first_reply}\n" in run.stdout and f"model> {second_reply.text}\n" in run.stdout


def test_a_chat_that_outgrows_the_context_forgets_its_oldest_exchanges_and_says_so(gen, capsys):
    context = gen.model.config.max_seq_len
    cfg = SampleConfig(max_new_tokens=16)
    long_question = " ".join(PROMPTS * 3)
    history = []
    for turn in range(40):  # far more than the context holds
        history.append(Message("user", long_question))
        history, prompt = fit_history(gen, history, "GPT4", cfg)
        assert len(prompt) + 16 <= context and history[-1].text == long_question and history[0].role == "user"
        history.append(Message("assistant", "1 2 3"))
    assert "oldest exchange" in capsys.readouterr().out and len(history) < 80
    history, prompt = fit_history(gen, [Message("user", "9 " * context)], "GPT4", cfg)
    assert prompt is None and history == []  # a message longer than the context alone is not sent


@pytest.mark.slow
def test_a_users_mistake_is_one_error_line_in_sample_and_eval(export):
    cases = [(["sample.py", "--checkpoint=/nonexistent", "--prompt=hi"], "error: /nonexistent has no crlft.json"),
             (["eval.py", "demo", "--checkpoint=/nonexistent"], "error: /nonexistent has no crlft.json"),
             (["sample.py", f"--checkpoint={export}", "--prompt=hi", "--condition=GPT5"],
              "error: unknown condition 'GPT5': the model was trained with")]
    for (script, *argv), message in cases:
        result = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(message)
