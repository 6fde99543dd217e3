"""Import a LiteLLM proxy ``config.yaml``: its ``model_list`` becomes provider
credentials, deployments, model groups and operator prices.

``litellm_config_parse`` reads no database and writes nothing: it resolves
``os.environ/NAME`` references and checks every entry, collecting every
problem. ``litellm_config_import`` compares that plan with the database and
writes only what differs, in one transaction. Identities are names derived from
the file, so importing the same file twice writes nothing the second time.
"""

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import yaml
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from accounts.services import audit_log_record
from billing.models import ModelPrice, PriceSource
from billing.selectors import model_price_at
from gateway_project.crypto import (
    DecryptionError,
    decrypt_text,
    derived_secret,
    mask_secret,
)
from gateway_project.generations import routing_changed
from gateway_project.money import from_micros
from routing.models import (
    Deployment,
    ModelGroup,
    ProviderCredential,
    name_validator,
)
from routing.providers import catalog_model
from routing.services import (
    deployment_create,
    deployment_update,
    model_group_create,
    model_group_members_set,
    provider_credential_create,
    provider_credential_update,
)

ENV_PREFIX = "os.environ/"
DEFAULT_TIMEOUT_MS = 60_000
MICROS_PER_MILLION_TOKENS = Decimal(10**12)  # USD per token → micro-USD per 1M
COST_KEYS = ("input_cost_per_token", "output_cost_per_token")

# litellm_params that configure LiteLLM's router rather than the call.
ROUTER_ONLY = {
    "max_retries": "a deployment is tried once; fallback is the gateway's",
    "num_retries": "a deployment is tried once; fallback is the gateway's",
    "stream_timeout": "the deployment's timeout applies to streams too",
    "input_cost_per_second": "only per-token prices are supported",
    "output_cost_per_second": "only per-token prices are supported",
    "tags": "tag-based routing is not supported",
    "max_parallel_requests": "limits are set per key, team and organization",
    "region_name": "not used by the gateway",
}
SETTING_REASONS = {
    "routing_strategy": "the gateway routes by priority, then weight",
    "context_window_fallbacks": "only `fallbacks` is imported",
    "content_policy_fallbacks": "only `fallbacks` is imported",
    "default_fallbacks": "only `fallbacks` is imported",
    "environment_variables": "not read: os.environ/ resolves from the environment",
    "credential_list": "not supported: give each entry its own api_key",
}
_SECRET_WORDS = {"key", "secret", "password", "token", "credential", "credentials"}
_SECRET_WORDS |= {"authorization"}


class _DecimalLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that floats load as Decimal: prices
    never pass through a float."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    assert isinstance(node, yaml.ScalarNode)
    try:
        return Decimal(str(loader.construct_scalar(node)).replace("_", ""))
    except InvalidOperation:  # .inf, .nan: never a price
        return loader.construct_yaml_float(node)


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


class LitellmConfigInvalid(Exception):
    """The file cannot be imported; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "The config cannot be imported:\n" + "\n".join(f"  - {p}" for p in problems)
        )
        self.problems = problems


@dataclass(frozen=True)
class CredentialPlan:
    name: str
    provider: str
    api_base: str
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class DeploymentPlan:
    name: str
    model: str
    credential: str  # a CredentialPlan's name, or "" for none
    litellm_params: dict[str, Any]
    timeout_ms: int
    rpm_limit: int | None
    tpm_limit: int | None


@dataclass(frozen=True)
class MemberPlan:
    deployment: str
    priority: int
    weight: int
    fallback: bool = False


@dataclass(frozen=True)
class Outcome:
    """One line of the report: created, changed, unchanged, skipped, ignored
    or warning."""

    action: str
    kind: str
    name: str
    detail: str = ""

    def line(self) -> str:
        text = f"{self.action:<9} {self.kind:<11} {self.name}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass
class Plan:
    """What a file asks for, with secrets resolved; nothing written yet."""

    credentials: dict[str, CredentialPlan] = field(default_factory=dict)
    deployments: dict[str, DeploymentPlan] = field(default_factory=dict)
    groups: dict[str, list[MemberPlan]] = field(default_factory=dict)
    prices: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[Outcome] = field(default_factory=list)


# --- parse -----------------------------------------------------------------------


def litellm_config_parse(*, text: str, environ: Mapping[str, str]) -> Plan:
    """The plan of a config file's text; reads no database, writes nothing.

    Raises LitellmConfigInvalid listing every problem (not YAML, no model_list,
    an entry without model_name or model, an unset environment variable, …);
    no message quotes a secret.
    """
    try:
        config = yaml.load(text, Loader=_DecimalLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        # Never str(error): its snippet of the offending line may hold a key.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "unreadable"
        raise LitellmConfigInvalid([f"not valid YAML{where}: {problem}"]) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_list"), list):
        raise LitellmConfigInvalid(["no model_list: expected a list of models"])
    if not config["model_list"]:
        raise LitellmConfigInvalid(["model_list is empty"])
    reader = _Reader(environ)
    for index, entry in enumerate(config["model_list"]):
        reader.entry(f"model_list[{index}]", entry)
    reader.settings(config)
    return reader.plan()


class _Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []
        self.missing: dict[str, list[str]] = {}
        self.result = Plan()
        self.entries_per_group: dict[str, int] = {}
        self.own: dict[str, list[MemberPlan]] = {}
        self.credential_names: dict[tuple[str, str, str], str] = {}
        self.price_owner: dict[str, str] = {}
        self.fallbacks: list[tuple[str, str, str]] = []
        self.ignored: dict[str, tuple[str, int]] = {}

    def ignore(self, name: str, reason: str) -> None:
        self.ignored[name] = (reason, self.ignored.get(name, (reason, 0))[1] + 1)

    def entry(self, where: str, entry: Any) -> None:
        group = entry.get("model_name") if isinstance(entry, dict) else None
        if not isinstance(group, str) or not group:
            self.problems.append(f"{where}: model_name is missing")
            return
        where = f"{where} ({group})"
        params, info = entry.get("litellm_params"), entry.get("model_info") or {}
        model = params.get("model") if isinstance(params, dict) else None
        if not isinstance(model, str) or not model:
            self.problems.append(f"{where}: litellm_params.model is missing")
            return
        if not isinstance(info, dict):
            self.problems.append(f"{where}: model_info is not a mapping")
            return
        count = self.entries_per_group[group] = self.entries_per_group.get(group, 0) + 1
        if "*" in group or "*" in model:
            self.skip(where, "wildcard models are not supported: name each model")
            return
        params = dict(params)
        costs = {key: params.pop(key, info.get(key)) for key in COST_KEYS}
        for key in [key for key in params if key in ROUTER_ONLY]:
            params.pop(key)
            self.ignore(f"litellm_params.{key}", ROUTER_ONLY[key])
        for key in sorted(set(info) - {"id", "base_model", *COST_KEYS}):
            self.ignore(f"model_info.{key}", "not used by the gateway")
        if "litellm_credential_name" in params:
            self.skip(where, "credential_list is not supported: set api_key here")
            return
        secrets = sorted(
            key
            for key, value in params.items()
            if key != "api_key" and _secret(key, value)
        )
        if secrets:
            self.skip(
                where,
                f"{', '.join(secrets)} cannot be stored: only api_key is kept "
                "(encrypted); add this deployment in the admin",
            )
            return
        api_key = params.get("api_key")
        variable = (
            api_key.removeprefix(ENV_PREFIX)
            if isinstance(api_key, str) and api_key.startswith(ENV_PREFIX)
            else ""
        )
        params = {key: self.resolve(where, key, value) for key, value in params.items()}
        name = str(info["id"]) if info.get("id") is not None else group
        if "id" not in info and count > 1:
            name = f"{group}:{count}"
        if not (
            self.valid_name(where, "model_name", group)
            and self.valid_name(where, "deployment name", name)
        ):
            return
        if name in self.result.deployments:
            self.problems.append(
                f"{where}: deployment name '{name}' is taken by another entry; "
                "give this one a model_info.id"
            )
            return
        self.price(where, str(params["model"]), costs, info.get("base_model"))
        self.deployment(where, group, name, params, variable or name)

    def skip(self, where: str, reason: str) -> None:
        self.result.notes.append(Outcome("skipped", "entry", where, reason))

    def valid_name(self, where: str, what: str, name: str) -> bool:
        try:
            name_validator(name)
        except ValidationError:
            self.problems.append(f"{where}: {what} '{name}' {name_validator.message}")
            return False
        return True

    def resolve(self, where: str, key: str, value: Any) -> Any:
        if not (isinstance(value, str) and value.startswith(ENV_PREFIX)):
            return value
        variable = value.removeprefix(ENV_PREFIX)
        resolved = self.environ.get(variable, "")
        if not resolved:
            self.missing.setdefault(variable, []).append(f"{where} {key}")
        return resolved

    def deployment(
        self, where: str, group: str, name: str, params: dict[str, Any], label: str
    ) -> None:
        model = str(params.pop("model"))
        api_key, api_base = params.pop("api_key", ""), params.pop("api_base", "")
        timeout, order = params.pop("timeout", None), params.pop("order", None)
        rpm, tpm = params.pop("rpm", None), params.pop("tpm", None)
        weight = params.pop("weight", 1)
        provider = _provider(model, params)
        if provider is None:
            self.problems.append(
                f"{where}: cannot tell the provider of '{model}': write it as "
                "'<provider>/<model>' or set custom_llm_provider"
            )
            return
        if not isinstance(api_key, str) or not isinstance(api_base, str):
            self.problems.append(f"{where}: api_key and api_base must be strings")
            return
        credential = ""
        if api_key:
            credential = self.credential(provider, api_base, api_key, label)
        elif api_base:
            params["api_base"] = api_base
        big = 2**31 - 1
        self.result.deployments[name] = DeploymentPlan(
            name=name,
            model=model,
            credential=credential,
            litellm_params=_json_safe(params),
            timeout_ms=DEFAULT_TIMEOUT_MS
            if timeout is None
            else self.number(where, "timeout", timeout, scale=1000, low=100, high=big),
            rpm_limit=None if rpm is None else self.number(where, "rpm", rpm, high=big),
            tpm_limit=None if tpm is None else self.number(where, "tpm", tpm, high=big),
        )
        self.own.setdefault(group, []).append(
            MemberPlan(
                deployment=name,
                priority=0 if order is None else self.number(where, "order", order) - 1,
                weight=self.number(where, "weight", weight),
            )
        )

    def credential(self, provider: str, api_base: str, api_key: str, label: str) -> str:
        """The credential's name: one per (provider, api_base, key), named by
        the variable that held the key, else by the first deployment using it
        (a keyed fingerprint of the key tells apart names that would clash)."""
        identity = (provider, api_base, api_key)
        if identity in self.credential_names:
            return self.credential_names[identity]
        fingerprint = hmac.new(
            derived_secret("litellm-config-credential"),
            "\n".join(identity).encode(),
            hashlib.sha256,
        ).hexdigest()[:8]
        host = (urlsplit(api_base).hostname or "") if api_base else ""
        name = f"{provider}:{label}" + (f"@{host}" if host else "")
        if name in self.result.credentials or len(name) > 100:
            name = f"{provider}:{label}"[:90] + f"-{fingerprint}"
        self.credential_names[identity] = name
        self.result.credentials[name] = CredentialPlan(
            name, provider, api_base, api_key
        )
        return name

    def number(
        self,
        where: str,
        key: str,
        value: Any,
        *,
        scale: int = 1,
        low: int = 1,
        high: int = 32767,
    ) -> int:
        """A whole number (``scale`` turns seconds into milliseconds, rounding
        half up); a problem is recorded when it is not one within bounds."""
        try:
            if isinstance(value, bool | float):
                raise InvalidOperation
            scaled = Decimal(str(value)) * scale
            if scale == 1 and scaled != scaled.to_integral_value():
                raise InvalidOperation
            number = int(scaled.quantize(Decimal(1), rounding=ROUND_HALF_UP))
        except (InvalidOperation, ValueError):
            number = low - 1
        if not low <= number <= high:
            unit = " ms" if scale == 1000 else ""
            self.problems.append(f"{where}: {key} must be from {low} to {high}{unit}")
            return low
        return number

    def price(
        self, where: str, model: str, costs: dict[str, Any], base_model: Any
    ) -> None:
        """The file's price per token, else that of model_info.base_model in
        litellm's map (Azure deployments are named by the operator)."""
        known = None
        if isinstance(base_model, str) and base_model:
            known = catalog_model(base_model) or catalog_model(
                base_model.split("/", 1)[-1]
            )
        if all(value is None for value in costs.values()):
            if known is None or known.input_cost_per_token is None:
                return
            costs = {
                "input_cost_per_token": known.input_cost_per_token,
                "output_cost_per_token": known.output_cost_per_token,
            }
        micros = []
        for key, value in costs.items():
            try:
                if isinstance(value, bool | float):
                    raise InvalidOperation
                cost = Decimal(str(value if value is not None else 0))
                if not cost.is_finite() or cost < 0:
                    raise InvalidOperation
            except InvalidOperation:
                self.problems.append(f"{where}: {key} must be a number of USD")
                return
            per_million = cost * MICROS_PER_MILLION_TOKENS
            micros.append(int(per_million.quantize(Decimal(1), rounding=ROUND_HALF_UP)))
        price = (micros[0], micros[1])
        if self.result.prices.get(model, price) != price:
            self.problems.append(
                f"{where}: prices of {model} differ from {self.price_owner[model]}"
            )
        self.result.prices.setdefault(model, price)
        self.price_owner.setdefault(model, where)

    def settings(self, config: dict[str, Any]) -> None:
        for section in sorted(set(config) - {"model_list"}):
            values = config[section]
            if section not in ("router_settings", "litellm_settings"):
                self.ignore(
                    section, SETTING_REASONS.get(section, "not used by the gateway")
                )
                continue
            if not isinstance(values, dict):
                self.problems.append(f"{section} is not a mapping")
                continue
            for key, value in values.items():
                if key == "fallbacks":
                    self.fallback_rules(f"{section}.fallbacks", value)
                else:
                    self.ignore(
                        f"{section}.{key}",
                        SETTING_REASONS.get(key, "not used by the gateway"),
                    )

    def fallback_rules(self, where: str, rules: Any) -> None:
        valid = isinstance(rules, list) and all(
            isinstance(rule, dict)
            and all(isinstance(t, str | list) for t in rule.values())
            for rule in rules
        )
        if not valid:
            self.problems.append(
                f"{where}: expected a list like [{{gpt-4o: [gpt-4o-mini]}}]"
            )
            return
        for rule in rules:
            for source, targets in rule.items():
                for target in [targets] if isinstance(targets, str) else targets:
                    self.fallbacks.append((where, str(source), str(target)))

    def plan(self) -> Plan:
        for variable, places in self.missing.items():
            self.problems.append(
                f"environment variable {variable} is not set "
                f"(used by {', '.join(places)})"
            )
        if self.problems:
            raise LitellmConfigInvalid(self.problems)
        groups = self.result.groups
        for group, members in self.own.items():
            groups[group] = sorted(members, key=lambda m: m.priority)
        for group in [g for g in self.entries_per_group if g not in groups]:
            self.result.notes.append(
                Outcome("skipped", "model group", group, "every entry was skipped")
            )
        for where, source, target in self.fallbacks:
            if source not in groups or target not in groups:
                missing = source if source not in groups else target
                self.ignore(
                    f"{where}: {source} → {target}",
                    f"'{missing}' is not an imported model_name",
                )
                continue
            base = max(member.priority for member in groups[source]) + 1
            present = {member.deployment for member in groups[source]}
            groups[source] = groups[source] + [
                MemberPlan(m.deployment, base + m.priority, m.weight, fallback=True)
                for m in self.own[target]
                if m.deployment not in present
            ]
        for name, (reason, times) in self.ignored.items():
            detail = f"{reason} ({times} entries)" if times > 1 else reason
            self.result.notes.append(Outcome("ignored", "setting", name, detail))
        return self.result


def _secret(key: str, value: Any) -> bool:
    """Whether a parameter holds a secret: by its name, or a header's name."""
    names = [key, *(map(str, value) if isinstance(value, dict) else [])]
    return any(
        _SECRET_WORDS & set(re.split(r"[^a-z]+", name.lower())) for name in names
    )


def _provider(model: str, params: dict[str, Any]) -> str | None:
    if params.get("custom_llm_provider"):
        return str(params["custom_llm_provider"])
    if "/" in model:
        return model.split("/", 1)[0]
    known = catalog_model(model)
    return known.provider if known else None


def _json_safe(value: Any) -> Any:
    """Plain JSON for litellm_params; litellm's own numbers (temperature…) are
    not money, so they may be floats."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


# --- import --------------------------------------------------------------------


def litellm_config_import(
    *,
    plan: Plan,
    dry_run: bool = False,
    actor: User | None = None,
    actor_label: str = "",
) -> list[Outcome]:
    """Make the database match a plan, in one transaction; returns one outcome
    per credential, price, deployment and group, then the skipped and ignored.

    Writes through the routing services and ``model_price_create`` (all
    audited); only what differs is written, and nothing with ``dry_run``.
    Groups get exactly the file's members; nothing is ever deleted.
    """
    who: dict[str, Any] = {"actor": actor, "actor_label": actor_label}
    with transaction.atomic():
        outcomes = [
            *_credentials_import(plan, dry_run, who),
            *_prices_import(plan, dry_run, who),
            *_deployments_import(plan, dry_run, who),
            *_groups_import(plan, dry_run, who),
        ]
    return [*outcomes, *plan.notes, *_unpriced(plan)]


def model_price_create(
    *,
    model: str,
    input_price_per_million_micros: int,
    output_price_per_million_micros: int,
    note: str = "",
    actor: User | None = None,
    actor_label: str = "",
) -> ModelPrice:
    """An operator price for a model, in force from now on; audited. Earlier
    prices stay, so usage records keep the price they were charged at."""
    with transaction.atomic():
        price = ModelPrice.objects.create(
            model=model,
            input_price_per_million_micros=input_price_per_million_micros,
            output_price_per_million_micros=output_price_per_million_micros,
            effective_from=timezone.now(),
            source=PriceSource.OPERATOR,
            note=note,
            created_by=actor,
        )
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="model_price.create",
            resource_type="model_price",
            resource_id=model,
            details={
                "input_price_per_million_micros": input_price_per_million_micros,
                "output_price_per_million_micros": output_price_per_million_micros,
            },
        )
    routing_changed()
    return price


def _credentials_import(
    plan: Plan, dry_run: bool, who: dict[str, Any]
) -> list[Outcome]:
    existing = ProviderCredential.objects.in_bulk(
        list(plan.credentials), field_name="name"
    )
    outcomes = []
    for wanted in plan.credentials.values():
        hint = mask_secret(wanted.api_key)
        current = existing.get(wanted.name)
        if current is None:
            if not dry_run:
                provider_credential_create(
                    name=wanted.name,
                    provider=wanted.provider,
                    api_key=wanted.api_key,
                    api_base=wanted.api_base,
                    **who,
                )
            detail = f"{wanted.provider}, key {hint}"
            outcomes.append(Outcome("created", "credential", wanted.name, detail))
            continue
        changes = {
            field: value
            for field, value in (
                ("provider", wanted.provider),
                ("api_base", wanted.api_base),
            )
            if getattr(current, field) != value
        }
        details = [f"{f} {getattr(current, f)!r} → {v!r}" for f, v in changes.items()]
        new_key = not _holds_key(current, wanted.api_key)
        if new_key:
            details.append(f"api_key {current.api_key_hint or '…'} → {hint}")
        if details and not dry_run:
            provider_credential_update(
                credential=current,
                changes=changes,
                api_key=wanted.api_key if new_key else None,
                **who,
            )
        outcomes.append(_outcome("credential", wanted.name, details))
    return outcomes


def _holds_key(credential: ProviderCredential, api_key: str) -> bool:
    """Whether the stored key is this one. Decrypted to compare only (Fernet
    tokens differ on every encryption); the plaintext goes nowhere."""
    try:
        stored = decrypt_text(credential.api_key_encrypted)
    except DecryptionError:  # encrypted under a retired key: store it anew
        return False
    return hmac.compare_digest(stored.encode(), api_key.encode())


def _prices_import(plan: Plan, dry_run: bool, who: dict[str, Any]) -> list[Outcome]:
    outcomes, now = [], timezone.now()
    for model, wanted in plan.prices.items():
        current = model_price_at(model=model, at=now)
        before = current and (
            current.input_price_per_million_micros,
            current.output_price_per_million_micros,
        )
        if before != wanted and not dry_run:
            model_price_create(
                model=model,
                input_price_per_million_micros=wanted[0],
                output_price_per_million_micros=wanted[1],
                note="import_litellm_config",
                **who,
            )
        if not before:
            outcomes.append(Outcome("created", "price", model, _per_million(*wanted)))
        else:
            changed = (
                []
                if before == wanted
                else [f"{_per_million(*before)} → {_per_million(*wanted)}"]
            )
            outcomes.append(_outcome("price", model, changed))
    return outcomes


def _per_million(input_price: int, output_price: int) -> str:
    def usd(micros: int) -> str:
        amount = from_micros(micros)
        cents = amount.quantize(Decimal("0.01"))
        return f"${cents if cents == amount else amount.normalize():f}"

    return f"{usd(input_price)} in, {usd(output_price)} out per 1M tokens"


def _deployments_import(
    plan: Plan, dry_run: bool, who: dict[str, Any]
) -> list[Outcome]:
    existing = {
        deployment.name: deployment
        for deployment in Deployment.objects.filter(
            name__in=list(plan.deployments)
        ).select_related("credential")
    }
    credentials = ProviderCredential.objects.in_bulk(
        [d.credential for d in plan.deployments.values() if d.credential],
        field_name="name",
    )
    outcomes = []
    for wanted in plan.deployments.values():
        fields: dict[str, Any] = {
            "model": wanted.model,
            "litellm_params": wanted.litellm_params,
            "timeout_ms": wanted.timeout_ms,
            "rpm_limit": wanted.rpm_limit,
            "tpm_limit": wanted.tpm_limit,
        }
        credential = credentials.get(wanted.credential)
        current = existing.get(wanted.name)
        if current is None:
            if not dry_run:
                deployment_create(
                    name=wanted.name, credential=credential, **fields, **who
                )
            detail = wanted.model + (
                f", credential {wanted.credential}" if wanted.credential else ""
            )
            outcomes.append(Outcome("created", "deployment", wanted.name, detail))
            continue
        changes = {f: v for f, v in fields.items() if getattr(current, f) != v}
        details = [_change(f, getattr(current, f), v) for f, v in changes.items()]
        held = current.credential.name if current.credential else ""
        if held != wanted.credential:
            changes["credential"] = credential
            details.append(
                f"credential {held or 'none'} → {wanted.credential or 'none'}"
            )
        if changes and not dry_run:
            deployment_update(deployment=current, changes=changes, **who)
        outcomes.append(_outcome("deployment", wanted.name, details))
    return outcomes


def _change(field: str, before: Any, after: Any) -> str:
    if field != "litellm_params":
        return f"{field} {before} → {after}"
    # Names only: a parameter's value is not printed.
    keys = sorted(
        key
        for key in before.keys() | after.keys()
        if before.get(key, ...) != after.get(key, ...)
    )
    return f"litellm_params ({', '.join(keys)})"


def _groups_import(plan: Plan, dry_run: bool, who: dict[str, Any]) -> list[Outcome]:
    names = {m.deployment for members in plan.groups.values() for m in members}
    deployments = Deployment.objects.in_bulk(list(names), field_name="name")
    existing = {
        group.group_name: group
        for group in ModelGroup.objects.filter(
            group_name__in=list(plan.groups)
        ).prefetch_related("members__deployment")
    }
    outcomes = []
    for group_name, members in plan.groups.items():
        current = existing.get(group_name)
        if current is None:
            detail = ", ".join(
                _member(m.deployment, m.priority, m.weight, m.fallback) for m in members
            )
            outcomes.append(Outcome("created", "model group", group_name, detail))
            if not dry_run:
                rows = [
                    (deployments[m.deployment], m.priority, m.weight) for m in members
                ]
                current = model_group_create(
                    group_name=group_name, members=[(d, p) for d, p, _ in rows], **who
                )
                if any(weight != 1 for _, _, weight in rows):
                    model_group_members_set(group=current, members=rows, **who)
            continue
        wanted = {m.deployment: (m.priority, m.weight) for m in members}
        held = {
            m.deployment.name: (m.priority, m.weight) for m in current.members.all()
        }
        details = [
            f"+{_member(name, *value)}"
            for name, value in wanted.items()
            if name not in held
        ]
        details += [
            f"-{_member(name, *value)}"
            for name, value in held.items()
            if name not in wanted
        ]
        details += [
            f"{name}{_member('', *held[name])} → {_member('', *value).strip()}"
            for name, value in wanted.items()
            if name in held and held[name] != value
        ]
        outcomes.append(_outcome("model group", group_name, details))
        if details and not dry_run:
            rows = [(deployments[m.deployment], m.priority, m.weight) for m in members]
            model_group_members_set(group=current, members=rows, **who)
    return outcomes


def _member(name: str, priority: int, weight: int, fallback: bool = False) -> str:
    extra = "".join(
        [f", weight {weight}" if weight != 1 else "", ", fallback" if fallback else ""]
    )
    return f"{name} (priority {priority}{extra})"


def _outcome(kind: str, name: str, details: list[str]) -> Outcome:
    if details:
        return Outcome("changed", kind, name, "; ".join(details))
    return Outcome("unchanged", kind, name)


def _unpriced(plan: Plan) -> list[Outcome]:
    """Deployments the pipeline will skip for want of a price (never free)."""
    now, outcomes = timezone.now(), []
    for deployment in plan.deployments.values():
        model = deployment.model
        known = catalog_model(model) or catalog_model(model.split("/", 1)[-1])
        if (
            model in plan.prices
            or (known is not None and known.input_cost_per_token is not None)
            or settings.GATEWAY_FALLBACK_PRICE is not None
            or model_price_at(model=model, at=now) is not None
        ):
            continue
        outcomes.append(
            Outcome(
                "warning",
                "deployment",
                deployment.name,
                f"no price for {model}: calls skip it until one is set "
                "(model_info.input_cost_per_token, or Model prices in the admin)",
            )
        )
    return outcomes


def report_summary(outcomes: list[Outcome], *, dry_run: bool) -> str:
    """The last line of the command's output."""
    counts = {
        action: sum(1 for outcome in outcomes if outcome.action == action)
        for action in ("created", "changed", "unchanged", "skipped", "ignored")
    }
    summary = ", ".join(f"{count} {action}" for action, count in counts.items())
    if dry_run:
        return f"Dry run, nothing written: {summary}."
    if not counts["created"] and not counts["changed"]:
        return f"Nothing to write: {summary}."
    return f"Imported: {summary}."
