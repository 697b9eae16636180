"""The OpenAI-compatible API on a real server process, through the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx2 as httpx
import openai
import pytest

from tests.server.conftest import serve

HI = [{"role": "user", "content": "Say hi."}]


def niyama(obj) -> dict:
    return obj.model_extra["niyama"]


def test_health_models_openapi(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == [server.model]
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(paths)


def test_chat(server):
    r = server.client().chat.completions.create(model=server.model, messages=HI, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    info = niyama(r)
    assert info["class"] == "interactive" and info["slo_met"] in (True, False)
    assert info["ttft"] > 0 and info["queue_time"] >= 0 and info["relegated"] is False


def test_chat_stream_matches_non_stream(server):
    client = server.client()
    full = client.chat.completions.create(model=server.model, messages=HI, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=server.model, messages=HI, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert niyama(last)["class"] == "interactive"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions(server):
    client = server.client()
    r = client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=5,
                                  temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert niyama(chunks[-1])["slo_met"] is not None


def test_stop_string(server):
    client = server.client()
    args = {"model": server.model, "prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [", 7"]}
    r = client.completions.create(**args)
    assert ", 7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
    assert streamed == r.choices[0].text  # a stop-string prefix is held back, never streamed


@pytest.mark.parametrize(("how", "expected"), [
    ({"extra_body": {"qos": "batch-10m"}}, "batch-10m"),
    ({"extra_body": {"qos": {"class": "batch-30m", "ttlt": 99.0, "importance": "critical"}}}, "batch-30m"),
    ({"extra_headers": {"X-Niyama-QoS": "batch-30m"}}, "batch-30m"),
    ({"service_tier": "flex"}, "batch-10m"),
    ({"service_tier": "priority"}, "interactive"),
    ({"extra_body": {"priority": -3}}, "interactive"),
])
def test_qos_selection(server, how, expected):
    r = server.client().chat.completions.create(model=server.model, messages=HI, max_tokens=2, **how)
    info = niyama(r)
    assert info["class"] == expected
    if "service_tier" in how:
        assert r.service_tier == how["service_tier"]
    if "qos" in how.get("extra_body", {}) and isinstance(how["extra_body"]["qos"], dict):
        assert info["qos"] == {"ttft": None, "tbt": None, "ttlt": 99.0, "importance": "critical"}


def test_qos_object_overrides_interactive_fields(server):
    r = server.client().chat.completions.create(model=server.model, messages=HI, max_tokens=2,
                                                extra_body={"qos": {"ttft": 30, "tbt": 2}})
    assert niyama(r)["qos"]["ttft"] == 30 and niyama(r)["qos"]["tbt"] == 2


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"extra_body": {"qos": "no-such-class"}}, "qos"),
    ({"extra_body": {"qos": {"ttft": -1}}}, "qos.ttft"),
    ({"extra_body": {"qos": {"importance": "vip"}}}, "qos.importance"),
    ({"extra_body": {"qos": {"deadline": 3}}}, "qos.deadline"),
    ({"extra_headers": {"X-Niyama-QoS": "nope"}}, "X-Niyama-QoS"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"seed": 1 << 64}, "seed"),
    ({"extra_body": {"qos": {"class": [1]}}}, "qos.class"),
    ({"max_tokens": "5"}, "max_tokens"),  # integers are JSON integers
    ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),  # and booleans JSON booleans
    ({"temperature": "0"}, "temperature"),  # and numbers JSON numbers
    ({"extra_body": {"top_p": True}}, "top_p"),
    ({"logprobs": True}, "logprobs"),  # not implemented: refused rather than silently ignored
    ({"tool_choice": "required"}, "tool_choice"),
    ({"extra_body": {"functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "f"}}},
     "functions"),
    ({"extra_body": {"modalities": ["text", "audio"]}}, "modalities"),
    ({"extra_body": {"response_format": {"json_schema": {}}}}, "response_format.type"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),  # only an assistant turn may lack content
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    # A union's error for what is wrong inside the list, not "Input should be a valid string".
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages.0.content.0.type"),
    ({"stop": ["x"] * 65}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream=True, as OpenAI
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),  # not dropped silently: the model reads text only
])
def test_bad_requests(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(**{"model": server.model, "messages": HI, **kwargs})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"]


def test_unknown_model(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-5", messages=HI)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert server.client().models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-5")


def test_an_assistant_refusal_part_is_history_text(server):
    messages = [{"role": "user", "content": "Tell me a secret."},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot share that."}]},
                {"role": "user", "content": [{"type": "text", "text": "Then say hi."}]}]
    client = server.client()
    with_refusal = client.chat.completions.create(model=server.model, messages=messages, max_tokens=2)
    empty = [messages[0], {"role": "assistant", "content": ""}, messages[2]]
    without = client.chat.completions.create(model=server.model, messages=empty, max_tokens=2)
    assert with_refusal.usage.prompt_tokens > without.usage.prompt_tokens  # its words are in the prompt


def test_unknown_model_is_refused_before_the_prompt_is_read(server):
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-5", prompt=[1, 99_999_999], max_tokens=2)


def test_service_tier_echo(server):
    """The default class is also the one the "priority" tier maps to; a request that asked for no tier (or
    "auto") must not be told it was served (and billed) as "priority"."""
    client = server.client()
    for asked, echoed in ((None, "default"), ("auto", "default"), ("default", "default"), ("priority", "priority"),
                          ("flex", "flex")):
        kwargs = {} if asked is None else {"service_tier": asked}
        assert client.chat.completions.create(model=server.model, messages=HI, max_tokens=1,
                                              **kwargs).service_tier == echoed
        chunks = list(client.chat.completions.create(model=server.model, messages=HI, max_tokens=1, stream=True,
                                                     **kwargs))
        assert {c.service_tier for c in chunks} == {echoed}


def test_vllm_style_parameters(server):
    """``top_k=-1`` (vLLM's "no limit") and a batch of one token-id prompt are taken; ``logprobs=0`` asks for
    the sampled tokens' logprobs, which this server does not give, so it is refused rather than ignored."""
    client = server.client()
    r = client.completions.create(model=server.model, prompt=[[1, 2, 3]], max_tokens=2, extra_body={"top_k": -1})
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="hi", max_tokens=2, logprobs=0)
    assert e.value.body["param"] == "logprobs" and e.value.body["code"] == "unsupported_parameter"


def test_legacy_completions_default_to_16_tokens(server):
    """As OpenAI and vLLM do: a legacy completion without max_tokens does not run to the context's end."""
    r = server.client().completions.create(model=server.model, prompt="Once upon a time", temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_null_means_the_default(server):
    body = {"model": server.model, "messages": HI, "max_tokens": 2, "temperature": None, "top_p": None,
            "n": None, "stream": None, "presence_penalty": None, "logprobs": None, "qos": None}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    stream = httpx.post(f"{server.url}/v1/chat/completions",
                        json=body | {"stream": True, "stream_options": {"include_usage": None}})
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")


def test_malformed_bodies_and_routes_get_openai_errors(server):
    chat = f"{server.url}/v1/chat/completions"
    bad_part = httpx.post(chat, json={"model": server.model, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]})
    assert bad_part.status_code == 400 and bad_part.json()["error"]["param"].startswith("messages.0.content")
    not_json = httpx.post(chat, content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] is None
    assert "not valid JSON" in not_json.json()["error"]["message"]
    for body in ({"data": {"model": server.model}}, {}):  # a form (curl -d without a JSON type), nothing
        not_an_object = httpx.post(chat, **body)
        assert not_an_object.status_code == 400 and "JSON object" in not_an_object.json()["error"]["message"]
    # Valid JSON whose number overflows to infinity: a deadline that never comes is refused.
    body = json.dumps({"model": server.model, "messages": HI, "max_tokens": 2, "qos": {"ttlt": 1.0}})
    endless = httpx.post(chat, content=body.replace('"ttlt": 1.0', '"ttlt": 1e309'),
                         headers={"Content-Type": "application/json"})
    assert endless.status_code == 400 and endless.json()["error"]["param"] == "qos.ttlt"
    # A lone surrogate is valid JSON but no text: the tokenizer refuses it, the client is told why.
    surrogate = httpx.post(chat, content=b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
                           % server.model.encode(), headers={"Content-Type": "application/json"})
    assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == "messages"
    assert "not valid Unicode text" in surrogate.json()["error"]["message"]
    nested = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": [[[1]]]})
    assert nested.status_code == 400
    assert nested.json()["error"]["message"] == "prompt.0.0: Input should be a valid integer"
    # ... and quoted back in an error message it must not turn a 400 into a 500.
    key = httpx.post(chat, content=b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                     b'"qos": {"\\ud800": 1}}' % server.model.encode(), headers={"Content-Type": "application/json"})
    assert key.status_code == 400 and key.json()["error"]["code"] == "invalid_qos"
    wizard = httpx.post(chat, json={"model": server.model, "messages": [{"role": "wizard", "content": "hi"}]})
    assert wizard.status_code == 400 and wizard.json()["error"]["param"] == "messages.0.role"
    assert httpx.head(f"{server.url}/health").status_code == 200
    for response in (httpx.get(f"{server.url}/v1/nope"), httpx.get(chat)):
        assert response.status_code in (404, 405) and response.json()["error"]["message"]


def test_a_bad_prompt_fails_alone(server):
    """Token ids outside the vocabulary are refused up front; a request running beside them is unharmed."""
    client = server.client()
    stream = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=12,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))  # the request is running
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[1, 99_999_999], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "99999999" in e.value.body["message"]
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest)) > 0


def test_a_stop_string_in_the_last_token_reports_stop(server):
    client = server.client()
    args = {"model": server.model, "prompt": "The capital of France is", "temperature": 0}
    token = client.completions.create(**args, max_tokens=1).choices[0].text
    assert len(token.strip()) >= 2  # the test cuts that one token in its middle
    cut = client.completions.create(**args, max_tokens=1, stop=[token.strip()[1:]])
    assert cut.choices[0].text == token[:token.index(token.strip()[1:])] and cut.choices[0].finish_reason == "stop"


def _num_aborted(server) -> float:
    lines = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
             if line.startswith("niyama:request_success_total") and 'finished_reason="abort"' in line]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def _wait_until_idle(server) -> None:
    deadline = time.monotonic() + 30
    while server.metric("niyama:num_requests_running") or server.metric("niyama:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the aborted request still holds KV blocks"
        time.sleep(0.1)


def test_disconnect_frees_kv(server):
    aborted = _num_aborted(server)
    stream = server.client().completions.create(model=server.model, prompt="Once upon a time", max_tokens=4000,
                                                stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.metric("niyama:kv_cache_usage_perc") > 0
    stream.close()
    _wait_until_idle(server)
    assert _num_aborted(server) == aborted + 1


def test_non_streaming_client_that_gives_up_aborts_its_request(server):
    aborted = _num_aborted(server)
    with pytest.raises(openai.APITimeoutError):  # the client closes its connection after 2 s
        server.client(timeout=2.0).completions.create(model=server.model, prompt="Once upon a time",
                                                      max_tokens=4000, extra_body={"ignore_eos": True})
    _wait_until_idle(server)
    assert _num_aborted(server) == aborted + 1


def test_64_concurrent_streams(server):
    client = server.async_client(timeout=600)

    async def one(i: int) -> tuple[str, str | None]:
        stream = await client.completions.create(model=server.model, prompt=f"Count from {i}:", max_tokens=8,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for c in stream:
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        return text, finish

    async def main():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(finish == "length" and text for text, finish in results)


def test_queue_full_429_and_priority(cache_dir):
    """One running slot, a queue of two: a third waiting request gets 429. Under the ``priority``
    scheduler the queued request with the lower vLLM ``priority`` value runs first. (This server also runs
    with KV blocks of 32 tokens instead of 16.)"""
    with serve(cache_dir, "--scheduler", "priority", "--max-num-seqs", "1", "--max-queued-requests", "2",
               "--block-size", "32") as s:
        assert "in blocks of 32 on cpu" in s.log.read_text()
        client = s.client(timeout=600)
        running = client.completions.create(model=s.model, prompt="Hello", max_tokens=4000, stream=True,
                                            extra_body={"ignore_eos": True})
        next(iter(running))  # it holds the only running slot now
        order: list[str] = []

        def queued(name: str, priority: int) -> None:
            client.completions.create(model=s.model, prompt="Hi", max_tokens=2, extra_body={"priority": priority})
            order.append(name)

        threads = []
        for n, (name, priority) in enumerate((("low", 5), ("high", -1)), start=1):
            threads.append(threading.Thread(target=queued, args=(name, priority)))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while s.metric("niyama:num_requests_waiting") < n:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=s.model, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["Retry-After"]
        assert e.value.body["code"] == "queue_full"
        assert s.metric("niyama:request_rejected_total") == 1  # (the server's default class)
        running.close()  # frees the slot: the queued requests run, the higher priority first
        for t in threads:
            t.join()
        assert order == ["high", "low"]
