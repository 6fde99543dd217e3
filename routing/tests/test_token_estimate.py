"""Token estimates (holds, TPM reservations, streams without usage): for
OpenAI-protocol models the gateway counts as litellm does, without importing
litellm into the worker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from routing import providers
from routing.providers import Target

ROOT = Path(__file__).resolve().parents[2]

MESSAGES = [
    [{"role": "user", "content": "Say hello"}],
    [{"role": "user", "content": ""}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "héllo wörld, how are you? 😀 <|endoftext|>"},
        {"role": "assistant", "content": "fine"},
    ],
    [{"role": "user", "content": "hi", "name": "bob"}],
]
TEXTS = ["", "hello world", "héllo 😀 " * 40]


def _target(model: str) -> Target:
    return Target(
        deployment_id=1,
        deployment_name="d",
        model=model,
        api_key="",
        api_base="http://127.0.0.1:1/v1",
        params={},
        timeout_seconds=5,
    )


@pytest.mark.parametrize(
    "model", ["openai/fake-model", "openai/gpt-4o-mini", "hosted_vllm/qwen2.5-7b"]
)
def test_counts_match_litellm(model):
    litellm = providers._litellm()
    target = _target(model)

    for messages in MESSAGES:
        for text in TEXTS:
            counted = providers._counted_here(target, {"messages": messages}, text)
            assert counted == (
                litellm.token_counter(model=model, messages=messages),
                litellm.token_counter(model=model, text=text) if text else 0,
            )
    for prompt in ["Say hello", ["one", "two"], [1, 2, 3]]:
        counted = providers._counted_here(target, {"prompt": prompt}, "")
        joined = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        assert counted == (litellm.token_counter(model=model, text=joined), 0)


@pytest.mark.parametrize(
    "model, body",
    [
        ("anthropic/claude-2", {"messages": MESSAGES[0]}),
        ("hosted_vllm/meta-llama-3-8b", {"messages": MESSAGES[0]}),
        ("openai/gpt-4o", {"messages": [{"role": "user", "content": None}]}),
        (
            "openai/gpt-4o",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}
                ]
            },
        ),
        (
            "openai/gpt-4o",
            {"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]},
        ),
        ("gpt-4o", {"messages": MESSAGES[0]}),
    ],
)
def test_litellm_counts_what_it_counts_differently(model, body):
    # Hugging Face tokenizers, content parts, tool calls, bare OpenAI names
    # (counted with o200k_base): litellm decides.
    assert providers._counted_here(_target(model), body, "") is None


def test_estimating_a_passthrough_call_does_not_import_litellm():
    code = (
        "import sys\n"
        "from routing.providers import Target, estimate_tokens\n"
        "t = Target(1, 'd', 'openai/gpt-4o-mini', '', 'http://x/v1', {}, 5.0)\n"
        "print(estimate_tokens(t, {'messages': [{'role': 'user', 'content': 'hi'}]}, 'ok'))\n"
        "print('litellm' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert result.stdout.split() == ["(8,", "1)", "False"]
