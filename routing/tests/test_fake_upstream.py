"""The fake OpenAI-compatible upstream itself, driven by the openai SDK and by
raw httpx over real HTTP. No database."""

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from routing.tests.fake_upstream import Behaviour, FakeUpstream

MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
DEFAULT_PIECES = ["Hello from", " the fake ", "upstream."]


@pytest.fixture
def client(fake_upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=fake_upstream.base("s"), api_key="x", max_retries=0
    ) as sdk:
        yield sdk


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return [
        line.removeprefix("data: ")
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def test_base_is_an_api_base_under_the_scenario(fake_upstream):
    assert fake_upstream.url.startswith("http://127.0.0.1:")
    assert fake_upstream.base("abc") == f"{fake_upstream.url}/abc/v1"


def test_chat_completion_with_the_sdk(client):
    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES)

    assert completion.id.startswith("chatcmpl-fake-")
    assert completion.object == "chat.completion"
    assert completion.model == "fake-model"
    assert isinstance(completion.created, int)
    assert len(completion.choices) == 1
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.model_dump(exclude_none=True) == USAGE


def test_chat_completion_echoes_the_model_and_programmed_fields(fake_upstream, client):
    fake_upstream.program(
        "s",
        content="Bonjour",
        finish_reason="length",
        prompt_tokens=100,
        completion_tokens=20,
    )

    completion = client.chat.completions.create(model="gpt-x", messages=MESSAGES)

    assert completion.model == "gpt-x"
    assert completion.choices[0].message.content == "Bonjour"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
    }


def test_requests_are_recorded_with_their_json(fake_upstream, client):
    client.chat.completions.create(model="fake-model", messages=MESSAGES)
    httpx.get(f"{fake_upstream.base('other')}/models")

    first, second = fake_upstream.requests
    assert (first.scenario, first.method, first.path) == (
        "s",
        "POST",
        "/s/v1/chat/completions",
    )
    assert first.json == {"messages": MESSAGES, "model": "fake-model"}
    assert first.headers["authorization"] == "Bearer x"
    assert first.headers["Authorization"] == "Bearer x"
    assert first.headers["content-type"] == "application/json"
    assert (second.scenario, second.method, second.path, second.json) == (
        "other",
        "GET",
        "/other/v1/models",
        None,
    )
    assert fake_upstream.calls("s") == 1
    assert fake_upstream.calls("other") == 1
    assert fake_upstream.calls("never") == 0


def test_stream_with_the_sdk_ends_with_a_usage_chunk_when_asked(client):
    stream = client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert len(chunks) == 4
    content_chunks, usage_chunk = chunks[:3], chunks[3]
    assert [c.choices[0].delta.content for c in content_chunks] == DEFAULT_PIECES
    assert [c.choices[0].delta.role for c in content_chunks] == [
        "assistant",
        None,
        None,
    ]
    assert [c.choices[0].finish_reason for c in content_chunks] == [
        None,
        None,
        "stop",
    ]
    assert [c.usage for c in content_chunks] == [None, None, None]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump(exclude_none=True) == USAGE


def test_stream_with_the_sdk_has_no_usage_chunk_unless_asked(client):
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True
        )
    )

    assert [c.choices[0].delta.content for c in chunks] == DEFAULT_PIECES
    assert [c.usage for c in chunks] == [None, None, None]


def test_stream_with_raw_httpx_is_chunked_sse_ending_in_done(fake_upstream):
    fake_upstream.program("s", chunks=["a", "b"])

    with httpx.stream(
        "POST",
        f"{fake_upstream.base('s')}/chat/completions",
        json={
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.status_code == 200
        assert response.http_version == "HTTP/1.1"
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["transfer-encoding"] == "chunked"
        events = sse_events(response)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    chunk_id, created = chunks[0]["id"], chunks[0]["created"]
    common = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": "m",
        "system_fingerprint": None,
    }
    assert chunks == [
        {
            **common,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "a"},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        },
        {
            **common,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "b"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": None,
        },
        {**common, "choices": [], "usage": USAGE},
    ]


def test_stream_of_empty_chunks_is_one_chunk_with_the_role(fake_upstream, client):
    fake_upstream.program("s", chunks=[])

    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True
        )
    )

    assert len(chunks) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[0].choices[0].finish_reason == "stop"


def test_chunk_delay_spaces_the_chunks(fake_upstream, client):
    fake_upstream.program("s", chunks=["a", "b", "c"], chunk_delay=0.1)

    stream = client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True
    )
    arrivals = [(c.choices[0].delta.content, time.monotonic()) for c in stream]

    assert [content for content, _ in arrivals] == ["a", "b", "c"]
    assert arrivals[1][1] - arrivals[0][1] >= 0.09
    assert arrivals[2][1] - arrivals[1][1] >= 0.09


def test_usage_false_leaves_usage_out(fake_upstream, client):
    fake_upstream.program("s", usage=False)

    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES)
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    embeddings = httpx.post(
        f"{fake_upstream.base('s')}/embeddings", json={"model": "e", "input": "a"}
    ).json()

    assert completion.usage is None
    assert "usage" not in completion.model_dump(exclude_unset=True)
    assert [c.choices[0].delta.content for c in chunks] == DEFAULT_PIECES
    assert [
        c.model_dump(exclude_unset=True).get("usage", "absent") for c in chunks
    ] == ["absent"] * 3
    assert "usage" not in embeddings


def test_embeddings_with_the_sdk_which_asks_for_base64(fake_upstream, client):
    fake_upstream.program("s", embedding_dims=4, prompt_tokens=3)

    response = client.embeddings.create(model="fake-embed", input=["a", "b"])

    assert fake_upstream.requests[0].json == {
        "input": ["a", "b"],
        "model": "fake-embed",
        "encoding_format": "base64",
    }
    assert [(e.object, e.index, e.embedding) for e in response.data] == [
        ("embedding", 0, [0.0625, 0.125, 0.1875, 0.25]),
        ("embedding", 1, [1.0625, 1.125, 1.1875, 1.25]),
    ]
    assert response.model == "fake-embed"
    assert response.usage.model_dump() == {"prompt_tokens": 3, "total_tokens": 3}


@pytest.mark.parametrize(
    ("raw_input", "count"),
    [("one string", 1), ([1, 2, 3], 1), ([[1, 2], [3]], 2), (["a", "b", "c"], 3)],
)
def test_embeddings_as_floats_one_per_input(fake_upstream, raw_input, count):
    fake_upstream.program("s", embedding_dims=2)

    response = httpx.post(
        f"{fake_upstream.base('s')}/embeddings",
        json={"model": "e", "input": raw_input, "encoding_format": "float"},
    )

    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": [i + 0.0625, i + 0.125]}
            for i in range(count)
        ],
        "model": "e",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }


def test_text_completions_with_the_sdk(fake_upstream, client):
    fake_upstream.program("s", content="abcdef")

    completion = client.completions.create(model="fake-model", prompt="hi")
    chunks = list(
        client.completions.create(
            model="fake-model",
            prompt="hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert completion.id.startswith("cmpl-fake-")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "abcdef"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.model_dump(exclude_none=True) == USAGE
    assert [c.choices[0].text for c in chunks[:3]] == ["ab", "cd", "ef"]
    assert [c.choices[0].finish_reason for c in chunks[:3]] == [None, None, "stop"]
    assert chunks[3].choices == []
    assert chunks[3].usage.model_dump(exclude_none=True) == USAGE
    assert len(chunks) == 4


def test_models_list(client):
    assert [model.id for model in client.models.list()] == ["fake-model"]


def test_status_sequence_plays_in_order_and_the_last_repeats(fake_upstream, client):
    fake_upstream.program("s", {"status": 500}, Behaviour(content="ok"))

    with pytest.raises(openai.InternalServerError) as failure:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    second = client.chat.completions.create(model="fake-model", messages=MESSAGES)
    third = client.chat.completions.create(model="fake-model", messages=MESSAGES)

    assert failure.value.status_code == 500
    assert failure.value.body == {
        "message": "fake upstream error 500",
        "type": "server_error",
        "code": None,
    }
    assert second.choices[0].message.content == "ok"
    assert third.choices[0].message.content == "ok"
    assert fake_upstream.calls("s") == 3


def test_one_behaviour_applies_to_every_call(fake_upstream, client):
    fake_upstream.program("s", status=429, error={"error": {"message": "slow down"}})

    for _ in range(2):
        with pytest.raises(openai.RateLimitError, match="slow down"):
            client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert fake_upstream.calls("s") == 2


def test_error_string_is_sent_raw(fake_upstream):
    fake_upstream.program("s", status=502, error="Bad Gateway")

    response = httpx.post(f"{fake_upstream.base('s')}/chat/completions", json={})

    assert response.status_code == 502
    assert response.text == "Bad Gateway"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_errors_apply_to_stream_requests_before_any_chunk(fake_upstream, client):
    fake_upstream.program("s", status=503)

    with pytest.raises(openai.InternalServerError) as failure:
        client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True
        )
    assert failure.value.status_code == 503


def test_scenarios_are_independent_and_reprogramming_restarts(fake_upstream):
    fake_upstream.program("a", {"status": 500}, {"status": 200})
    fake_upstream.program("b", status=404)

    def status(scenario: str) -> int:
        url = f"{fake_upstream.base(scenario)}/chat/completions"
        return httpx.post(url, json={}).status_code

    assert [status("a"), status("b"), status("c"), status("a")] == [500, 404, 200, 200]
    fake_upstream.program("a", {"status": 500}, {"status": 200})
    assert status("a") == 500


def test_program_refuses_mixed_or_unknown_arguments(fake_upstream):
    with pytest.raises(TypeError):
        fake_upstream.program("s", {"status": 500}, status=500)
    with pytest.raises(TypeError):
        fake_upstream.program("s", {"statsu": 500})


def test_latency_beyond_the_client_timeout_is_a_timeout(fake_upstream):
    fake_upstream.program("s", latency=1.0)

    started = time.monotonic()
    with (
        openai.OpenAI(
            base_url=fake_upstream.base("s"), api_key="x", max_retries=0, timeout=0.2
        ) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)

    assert time.monotonic() - started < 0.8
    # Recorded before the latency, which is still running.
    assert fake_upstream.calls("s") == 1
    assert fake_upstream.requests[0].json == {
        "messages": MESSAGES,
        "model": "fake-model",
    }


def test_latency_delays_the_response(fake_upstream, client):
    fake_upstream.program("s", latency=0.2, content="late")

    started = time.monotonic()
    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES)

    assert time.monotonic() - started >= 0.2
    assert completion.choices[0].message.content == "late"


def test_malformed_body_is_200_but_not_json(fake_upstream, client):
    fake_upstream.program("s", malformed=True)

    raw = httpx.post(f"{fake_upstream.base('s')}/chat/completions", json={})
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        raw.json()
    # The SDK does not wrap this in an APIError.
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)


def test_malformed_stream_is_garbage_sse(fake_upstream, client):
    fake_upstream.program("s", malformed=True)

    with httpx.stream(
        "POST",
        f"{fake_upstream.base('s')}/chat/completions",
        json={"model": "m", "stream": True},
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events == ['{"id": "fake", "choices": [ not JSON', "[DONE]"]
    stream = client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True
    )
    with pytest.raises(json.JSONDecodeError):
        next(iter(stream))


def test_hold_keeps_the_rest_of_the_stream_until_released(fake_upstream, client):
    hold, first_chunk_sent = threading.Event(), threading.Event()
    fake_upstream.program("s", hold=hold, first_chunk_sent=first_chunk_sent)
    try:
        stream = iter(
            client.chat.completions.create(
                model="fake-model", messages=MESSAGES, stream=True
            )
        )
        first = next(stream)
        assert first.choices[0].delta.content == "Hello from"
        # The fake sets the event just after writing the chunk, which the
        # client may read first.
        assert first_chunk_sent.wait(5)

        rest: list[str | None] = []
        reader = threading.Thread(
            target=lambda: rest.extend(c.choices[0].delta.content for c in stream)
        )
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "the rest of the stream came before the release"
        assert rest == []

        hold.set()
        reader.join(5)
        assert not reader.is_alive()
        assert rest == DEFAULT_PIECES[1:]
    finally:
        hold.set()


def test_drop_mid_stream_cuts_the_connection_after_the_first_chunk(
    fake_upstream, client
):
    fake_upstream.program("s", drop_mid_stream=True)

    received = []
    stream = client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True
    )
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hello from"]

    with (
        httpx.stream(
            "POST",
            f"{fake_upstream.base('s')}/chat/completions",
            json={"model": "m", "stream": True},
        ) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        response.read()


def test_drop_mid_stream_also_cuts_a_non_stream_body(fake_upstream, client):
    fake_upstream.program("s", drop_mid_stream=True)

    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)


def test_unknown_paths_are_404_recorded_and_do_not_advance_the_program(
    fake_upstream, client
):
    fake_upstream.program("s", {"status": 500}, {"content": "ok"})

    unknown = httpx.get(f"{fake_upstream.base('s')}/nope")
    wrong_method = httpx.get(f"{fake_upstream.base('s')}/chat/completions")
    no_scenario = httpx.post(f"{fake_upstream.url}/hello", json={"a": 1})

    assert [unknown.status_code, wrong_method.status_code, no_scenario.status_code] == [
        404
    ] * 3
    assert unknown.json()["error"]["code"] == "not_found"
    assert [(r.scenario, r.path) for r in fake_upstream.requests] == [
        ("s", "/s/v1/nope"),
        ("s", "/s/v1/chat/completions"),
        ("hello", "/hello"),
    ]
    assert fake_upstream.requests[2].json == {"a": 1}
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="fake-model", messages=MESSAGES)


def test_a_client_hanging_up_mid_stream_is_silent(fake_upstream, client, capfd):
    hold, finished = threading.Event(), threading.Event()
    fake_upstream.program("s", hold=hold, finished=finished, chunks=["x" * 1000] * 100)
    try:
        with httpx.stream(
            "POST",
            f"{fake_upstream.base('s')}/chat/completions",
            json={"model": "m", "stream": True},
        ) as response:
            assert next(response.iter_lines()).startswith("data: ")
    finally:
        hold.set()  # the server now writes into a closed connection

    # The fake is done with the call once it noticed the hang-up.
    assert finished.wait(10)
    assert fake_upstream.requests[-1].hung_up
    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert capfd.readouterr().err == ""


def test_finished_is_set_once_a_response_is_written_out(fake_upstream):
    finished = threading.Event()
    fake_upstream.program("s", finished=finished)

    response = httpx.post(
        f"{fake_upstream.base('s')}/chat/completions",
        json={"model": "m", "stream": True},
    )

    assert response.status_code == 200 and "data: [DONE]" in response.text
    assert finished.wait(5)
    assert not fake_upstream.requests[-1].hung_up


def test_concurrent_calls_take_the_program_in_turn(fake_upstream):
    fake_upstream.program("s", *([{"status": 500}] * 5), {"status": 200})
    url = f"{fake_upstream.base('s')}/chat/completions"

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(
            pool.map(lambda _: httpx.post(url, json={}).status_code, range(20))
        )

    assert sorted(statuses) == [200] * 15 + [500] * 5
    assert fake_upstream.calls("s") == 20


def test_reset_forgets_programs_and_requests(fake_upstream):
    fake_upstream.program("s", status=500)
    httpx.get(f"{fake_upstream.base('s')}/models")

    fake_upstream.reset()

    assert fake_upstream.requests == []
    assert fake_upstream.calls("s") == 0
    assert httpx.get(f"{fake_upstream.base('s')}/models").status_code == 200


def test_a_private_server_starts_and_closes():
    with FakeUpstream() as fake:
        assert httpx.get(f"{fake.base('s')}/models").status_code == 200
        url = fake.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/s/v1/models", timeout=1)
    fake.close()  # closing twice is harmless
