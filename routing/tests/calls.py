"""A chat call through Django's test client, as the request-path tests make it."""

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def chat_call(client, plaintext: str):
    return client.post(
        "/v1/chat/completions",
        CHAT,
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )


def stream_in_process(plaintext: str, body: dict):
    """A streamed call read whole in the event loop that served it, as a
    server does (Django's sync test client reads the rest of an async stream
    in another loop, where the upstream's connection is not): the response
    and its bytes."""
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    async def read():
        response = await AsyncClient().post(
            "/v1/chat/completions",
            body,
            content_type="application/json",
            headers={"X-API-Key": plaintext},
        )
        return response, b"".join([part async for part in response.streaming_content])

    return async_to_sync(read)()
