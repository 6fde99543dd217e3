"""A chat call through Django's test client, as the request-path tests make it."""

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def chat_call(client, plaintext: str):
    return client.post(
        "/v1/chat/completions",
        CHAT,
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )
