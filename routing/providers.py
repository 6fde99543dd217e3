"""The provider adapter: the only module that touches litellm.

``model_catalog`` reads litellm's bundled model map (the same file litellm
itself uses with LITELLM_LOCAL_MODEL_COST_MAP=True) without importing litellm,
so management requests stay fast; prices are parsed as Decimal, never float.
"""

import importlib.util
import json
import os
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

_MODEL_MAP_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True)
class CatalogModel:
    """A model litellm knows: its provider and, per token, its list prices."""

    name: str
    provider: str
    mode: str
    input_cost_per_token: Decimal | None
    output_cost_per_token: Decimal | None

    @property
    def litellm_model(self) -> str:
        """The model string litellm routes: ``provider/name``."""
        return (
            self.name
            if self.name.startswith(f"{self.provider}/")
            else f"{self.provider}/{self.name}"
        )


@cache
def model_catalog() -> dict[str, CatalogModel]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / _MODEL_MAP_FILE
    raw: dict[str, Any] = json.loads(path.read_text(), parse_float=Decimal)
    catalog = {}
    for name, entry in raw.items():
        if (
            name == "sample_spec"
            or not isinstance(entry, dict)
            or not entry.get("litellm_provider")
        ):
            continue  # "sample_spec" documents the file's format
        catalog[name] = CatalogModel(
            name=name,
            provider=str(entry["litellm_provider"]),
            mode=str(entry.get("mode", "")),
            input_cost_per_token=_decimal(entry.get("input_cost_per_token")),
            output_cost_per_token=_decimal(entry.get("output_cost_per_token")),
        )
    return catalog


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def catalog_model(name: str) -> CatalogModel | None:
    return model_catalog().get(name)
