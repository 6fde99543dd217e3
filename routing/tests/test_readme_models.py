"""Every model the README offers as one litellm knows is in the pinned
litellm's catalogue, with an input and an output price: a name it does not
know gets 400 ``unknown_model`` from the model-group API, and one without a
price could not be charged."""

import re
from pathlib import Path

import pytest

from routing.providers import catalog_model

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _offered() -> list[str]:
    names = re.findall(r'"model_name": "([^"]+)"', README)
    # The shortcut sentence: "model names litellm knows (`a`, `b`) ..."
    sentence = re.search(r"model names litellm knows \(([^)]*)\)", README)
    assert sentence is not None, "the README's shortcut sentence moved"
    names += re.findall(r"`([^`]+)`", sentence.group(1))
    # The providers table: the hosted providers' rows (the local servers'
    # models are whatever the operator serves)
    for label, provider in (("OpenAI", "openai"), ("Anthropic", "anthropic")):
        names += re.findall(
            rf"^\| {label} \| [^|]* \| `{provider}/([^`]+)` \|", README, re.M
        )
    return sorted(set(names))


def test_the_readme_offers_models():
    assert {"gpt-4o", "claude-sonnet-4-6"} <= set(_offered())


@pytest.mark.parametrize("name", _offered())
def test_a_model_the_readme_offers_is_known_with_a_price(name):
    known = catalog_model(name)

    assert known is not None, f"{name} is not in the pinned litellm's catalogue"
    assert known.input_cost_per_token and known.output_cost_per_token
