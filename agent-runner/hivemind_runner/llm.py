"""LLM egress: the runner's OpenAI-compatible proxy behind ``POST /v1/llm/chat/completions`` (DESIGN §8).

Agents have no network. Their LLM calls go through the bridge to an :class:`LlmGateway` in the runner
process, which:

- sends a call only to a provider in the room's egress allow-list that the operator configured
  (``openrouter``, ``tinfoil``, or an OpenAI-compatible base URL from configuration);
- enforces the run's call and token budgets **before** each call: it reserves the estimated prompt
  tokens plus ``max_tokens`` (clamped to what is left), and reconciles with the provider's reported
  usage afterwards;
- meters usage per stage and per provider/model for the receipt and settlement;
- holds every provider credential itself: the operator's key from configuration, or the payer
  tenant's own key, sealed to the runner (HPKE, :func:`hivemind.envelope.seal_provider_key`) and
  opened here when the run needs it. A key never enters a container: it is only put in the
  ``Authorization`` header of the outbound request, and scrubbed from anything the provider sends back.

Requests pass through an allow-list of OpenAI chat-completion fields; fields that widen egress beyond
the provider (web search plugins, provider routing overrides, non-function tools) are refused.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr, ValidationError, field_validator

from hivemind.envelope import HpkeKeyPair, SealedEnvelope, open_provider_key
from hivemind.errors import EnvelopeError, HivemindError, InvalidInput
from hivemind.models import Budgets, Stage, StrictModel

logger = logging.getLogger(__name__)

BUILTIN_BASE_URLS = {
    "openrouter": "https://openrouter.ai/api/v1",
    "tinfoil": "https://inference.tinfoil.sh/v1",
}
PROVIDERS_ENV = "HIVEMIND_LLM_PROVIDERS"
MAX_MODEL_CHARS = 128
# Rough bytes-per-token of JSON chat requests; used only to reserve budget before a call.
_BYTES_PER_TOKEN = 4
_SCRUBBED = "[REDACTED]"

ProviderName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]

# OpenAI chat-completion request fields that are passed to providers. Anything else is refused, so an
# agent cannot switch on provider features that reach further than the provider (web search plugins,
# routing to other upstreams, data-collection opt-ins).
PASSED_FIELDS = frozenset(
    {
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
        "user",
    }
)
HANDLED_FIELDS = frozenset({"model", "stream", "n"})


# --- errors (their code and status are the bridge contract's) -------------------------------------


class ProviderNotAllowed(HivemindError):
    code = "provider_not_allowed"
    status = 403


class LlmBudgetExceeded(HivemindError):
    code = "budget_exceeded"
    status = 429


class LlmProviderError(HivemindError):
    """The provider failed or answered something that is not a chat completion; the call still counts."""

    code = "llm_provider_error"
    status = 502


class InvalidLlmRequest(HivemindError):
    code = "invalid_request"
    status = 400


# --- configuration ----------------------------------------------------------------------------------


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProviderConfig(StrictModel):
    """One provider the runner can reach. ``api_key`` is the operator's key (None: tenant keys only)."""

    name: ProviderName
    base_url: str = Field(min_length=1, max_length=2048)
    api_key: SecretStr | None = None
    default_model: str | None = Field(default=None, min_length=1, max_length=256)
    default_max_tokens: int = Field(default=4096, ge=1, le=1_000_000)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    max_response_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    @field_validator("base_url")
    @classmethod
    def _https(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("base_url must be an absolute http(s) URL")
        # Keys travel in a header: only TLS leaves the machine (plain HTTP is for loopback test servers).
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError("base_url must use https (plain http only for loopback)")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("base_url must not carry a query, fragment or credentials")
        return url.rstrip("/")

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/chat/completions"


def _env_name(provider: str, what: str) -> str:
    return f"HIVEMIND_LLM_{re.sub(r'[^A-Z0-9]', '_', provider.upper())}_{what}"


class LlmConfig(StrictModel):
    """The providers this runner can reach, by name."""

    providers: dict[ProviderName, ProviderConfig] = Field(default_factory=dict)
    trust_env: bool = Field(default=False, description="let httpx read proxy settings from the environment")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LlmConfig:
        """Providers from ``HIVEMIND_LLM_*`` variables (docs/bridge.md, "Configuration").

        ``openrouter`` and ``tinfoil`` are always known; ``HIVEMIND_LLM_PROVIDERS`` (JSON
        ``{name: {"base_url": ..., "default_model": ...}}``) adds OpenAI-compatible ones. For every
        provider ``P``: ``HIVEMIND_LLM_<P>_API_KEY`` (operator key), ``..._BASE_URL``,
        ``..._DEFAULT_MODEL``, ``..._DEFAULT_MAX_TOKENS``, ``..._TIMEOUT_S``.
        """
        env = os.environ if environ is None else environ
        declared: dict[str, dict[str, Any]] = {
            name: {"base_url": url} for name, url in BUILTIN_BASE_URLS.items()
        }
        raw = env.get(PROVIDERS_ENV)
        if raw:
            try:
                extra = json.loads(raw)
            except ValueError as exc:
                raise InvalidInput(f"{PROVIDERS_ENV} is not JSON: {exc}") from None
            if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
                raise InvalidInput(f"{PROVIDERS_ENV} must be an object of provider objects")
            for name, fields in extra.items():
                declared[name] = {**declared.get(name, {}), **fields}
        providers: dict[str, ProviderConfig] = {}
        for name, fields in declared.items():
            settings = dict(fields)
            for key, suffix in (
                ("api_key", "API_KEY"),
                ("base_url", "BASE_URL"),
                ("default_model", "DEFAULT_MODEL"),
                ("default_max_tokens", "DEFAULT_MAX_TOKENS"),
                ("timeout_s", "TIMEOUT_S"),
            ):
                value = env.get(_env_name(name, suffix))
                if value:
                    settings[key] = value
            try:
                providers[name] = ProviderConfig(name=name, **settings)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise InvalidInput(f"LLM provider {name!r}: {where}: {error['msg']}") from None
        return cls(providers=providers, trust_env=env.get("HIVEMIND_LLM_TRUST_ENV") == "1")


# --- tenant keys sealed to the runner ----------------------------------------------------------------


TenantKeyLookup = Callable[[str], Mapping[str, str]]
"""``tenant_id -> {provider: SealedEnvelope JSON}``: the tenant record's ``provider_keys``."""


# --- metering -----------------------------------------------------------------------------------------


@dataclass
class StageLlmUsage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class _Reservation:
    tokens: int


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    relevant = {key: body[key] for key in ("messages", "tools", "response_format") if key in body}
    size = len(json.dumps(relevant, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return max(1, math.ceil(size / _BYTES_PER_TOKEN))


class RunLlm:
    """One run's LLM egress: the allow-list, the shared budgets and the meter. Thread-safe."""

    def __init__(
        self,
        gateway: LlmGateway,
        *,
        run_id: str,
        allowed_providers: Sequence[str],
        budgets: Budgets,
        payer_tenant_id: str | None,
    ):
        self._gateway = gateway
        self.run_id = run_id
        self.allowed_providers = tuple(allowed_providers)
        self._call_budget = budgets.llm_calls
        self._token_budget = budgets.tokens
        self._payer = payer_tenant_id
        self._lock = threading.Lock()
        self._calls_used = 0
        self._calls_in_flight = 0
        self._tokens_used = 0
        self._tokens_reserved = 0
        self._by_stage: dict[Stage, StageLlmUsage] = {}
        self._by_model: dict[tuple[str, str, str], StageLlmUsage] = {}
        self._keys: dict[str, tuple[SecretStr, str]] = {}

    # --- what is left ---

    def remaining_calls(self) -> int:
        with self._lock:
            return max(0, self._call_budget - self._calls_used - self._calls_in_flight)

    def remaining_tokens(self) -> int:
        with self._lock:
            return max(0, self._token_budget - self._tokens_used - self._tokens_reserved)

    def stage_usage(self, stage: Stage) -> StageLlmUsage:
        with self._lock:
            usage = self._by_stage.get(stage, StageLlmUsage())
            return StageLlmUsage(usage.calls, usage.prompt_tokens, usage.completion_tokens)

    def provider_usage(self) -> list[dict[str, Any]]:
        """What settlement charges: tokens spent through the operator's keys, per provider and model.

        Calls made with the payer's own key are billed to the payer by the provider; they count
        against the run's budgets and appear in the stage usage, but not here.
        """
        with self._lock:
            return [
                {
                    "provider": provider,
                    "model": model,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                }
                for (provider, model, key_owner), usage in sorted(self._by_model.items())
                if key_owner == "operator"
            ]

    # --- the call ---

    def _route(self, model: Any) -> tuple[ProviderConfig, str]:
        if model is not None and (not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS):
            raise InvalidLlmRequest("model must be a non-empty string '<provider>/<model>'")
        if not self.allowed_providers:
            raise ProviderNotAllowed("this room allows no LLM provider")
        if model is None or "/" not in model:
            provider_name = next(
                (name for name in self.allowed_providers if name in self._gateway.config.providers), None
            )
            if provider_name is None:
                raise ProviderNotAllowed("no provider of this room's allow-list is configured on this runner")
            provider = self._gateway.config.providers[provider_name]
            model_name = model or provider.default_model
            if model_name is None:
                raise InvalidLlmRequest(
                    f"provider {provider_name} has no default model: name one as '{provider_name}/<model>'"
                )
            return provider, model_name
        provider_name, _, model_name = model.partition("/")
        if provider_name not in self.allowed_providers:
            raise ProviderNotAllowed(f"provider {provider_name!r} is not in this room's allow-list")
        provider = self._gateway.config.providers.get(provider_name)
        if provider is None:
            raise ProviderNotAllowed(f"provider {provider_name!r} is not configured on this runner")
        if not model_name:
            raise InvalidLlmRequest("model must be '<provider>/<model>'")
        if provider_name == "openrouter" and ":online" in model_name:
            raise InvalidLlmRequest(
                "web-search model variants (':online') are not available through the bridge"
            )
        return provider, model_name

    def _key(self, provider: ProviderConfig) -> tuple[SecretStr, str]:
        with self._lock:
            cached = self._keys.get(provider.name)
        if cached is not None:
            return cached
        key = self._gateway.tenant_key(self._payer, provider.name)
        chosen = (key, "tenant") if key is not None else None
        if chosen is None:
            if provider.api_key is None:
                raise ProviderNotAllowed(
                    f"provider {provider.name!r} has no operator key on this runner and the payer has none"
                )
            chosen = (provider.api_key, "operator")
        with self._lock:
            self._keys.setdefault(provider.name, chosen)
            return self._keys[provider.name]

    def _request_body(self, body: Mapping[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
        outbound: dict[str, Any] = {key: value for key, value in body.items() if key in PASSED_FIELDS}
        outbound["model"] = model
        outbound["stream"] = False
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        outbound.pop("max_tokens", None)
        outbound.pop("max_completion_tokens", None)
        outbound[field] = max_tokens
        return outbound

    @staticmethod
    def _check_request(body: Mapping[str, Any]) -> int | None:
        unknown = sorted(key for key in body if key not in PASSED_FIELDS and key not in HANDLED_FIELDS)
        if unknown:
            raise InvalidLlmRequest(f"field(s) {', '.join(unknown)} are not passed to LLM providers")
        if body.get("stream") not in (None, False):
            raise InvalidLlmRequest("stream is not supported: tokens are counted per completed call")
        if body.get("n") not in (None, 1):
            raise InvalidLlmRequest("n must be 1")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise InvalidLlmRequest("messages must be a non-empty list of message objects")
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(
                isinstance(tool, dict) and tool.get("type") == "function" for tool in tools
            ):
                raise InvalidLlmRequest("tools must be a list of function tools")
        requested = None
        for key in ("max_tokens", "max_completion_tokens"):
            if key in body and body[key] is not None:
                value = _count(body[key])
                if value is None or value == 0:
                    raise InvalidLlmRequest(f"{key} must be a positive integer")
                requested = value if requested is None else min(requested, value)
        return requested

    def _reserve(
        self, prompt_estimate: int, requested: int | None, provider: ProviderConfig
    ) -> tuple[int, int]:
        with self._lock:
            if self._calls_used + self._calls_in_flight >= self._call_budget:
                raise LlmBudgetExceeded(f"the run's LLM call budget ({self._call_budget}) is used up")
            left = self._token_budget - self._tokens_used - self._tokens_reserved
            room = left - prompt_estimate
            if room < 1:
                raise LlmBudgetExceeded(
                    f"the run's token budget has {max(left, 0)} tokens left; this request needs about "
                    f"{prompt_estimate} for its prompt alone"
                )
            max_tokens = min(requested or provider.default_max_tokens, room)
            self._calls_in_flight += 1
            self._tokens_reserved += prompt_estimate + max_tokens
            return max_tokens, prompt_estimate + max_tokens

    def _settle(
        self,
        *,
        stage: Stage,
        reservation: int,
        provider: str,
        model: str,
        key_owner: str,
        usage: tuple[int, int] | None,
    ) -> None:
        with self._lock:
            self._calls_in_flight -= 1
            self._calls_used += 1
            self._tokens_reserved -= reservation
            prompt_tokens, completion_tokens = usage if usage is not None else (0, 0)
            self._tokens_used += prompt_tokens + completion_tokens
            for meter in (
                self._by_stage.setdefault(stage, StageLlmUsage()),
                self._by_model.setdefault((provider, model, key_owner), StageLlmUsage()),
            ):
                meter.calls += 1
                meter.prompt_tokens += prompt_tokens
                meter.completion_tokens += completion_tokens

    def complete(self, stage: Stage, body: Mapping[str, Any]) -> dict[str, Any]:
        """One chat completion for ``stage``; returns the provider's ``chat.completion`` object.

        Raises :class:`InvalidLlmRequest`, :class:`ProviderNotAllowed`, :class:`LlmBudgetExceeded` (no call
        was made) or :class:`LlmProviderError` (the call was made and counts).
        """
        if not isinstance(body, Mapping):
            raise InvalidLlmRequest("the request must be a JSON object")
        requested = self._check_request(body)
        provider, model = self._route(body.get("model"))
        api_key, key_owner = self._key(provider)
        prompt_estimate = _estimate_prompt_tokens(body)
        max_tokens, reservation = self._reserve(prompt_estimate, requested, provider)
        usage: tuple[int, int] | None = None
        try:
            response = self._gateway.post(provider, api_key, self._request_body(body, model, max_tokens))
            usage = _reported_usage(response)
            if usage is None:
                # No usable usage report: charge what was reserved, never less.
                usage = (prompt_estimate, max_tokens)
                response["usage"] = {
                    "prompt_tokens": prompt_estimate,
                    "completion_tokens": max_tokens,
                    "total_tokens": prompt_estimate + max_tokens,
                }
            returned_model = response.get("model")
            response["model"] = (
                f"{provider.name}/{returned_model if isinstance(returned_model, str) else model}"
            )
            return response
        finally:
            self._settle(
                stage=stage,
                reservation=reservation,
                provider=provider.name,
                model=model,
                key_owner=key_owner,
                usage=usage,
            )


def _reported_usage(response: Mapping[str, Any]) -> tuple[int, int] | None:
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt_tokens, completion_tokens = (
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
    )
    if prompt_tokens is None or completion_tokens is None:
        return None
    return prompt_tokens, completion_tokens


def _scrub(value: Any, secret: str) -> Any:
    """``value`` with every occurrence of ``secret`` in its strings replaced: a provider that echoes the
    Authorization header (in an error text, a reflected prompt) must not hand the key to the agent."""
    if isinstance(value, str):
        return value.replace(secret, _SCRUBBED) if secret in value else value
    if isinstance(value, list):
        return [_scrub(item, secret) for item in value]
    if isinstance(value, dict):
        return {_scrub(key, secret): _scrub(item, secret) for key, item in value.items()}
    return value


class LlmGateway:
    """The runner's LLM egress. One per runner process; :meth:`open_run` gives each run its meter."""

    def __init__(
        self,
        config: LlmConfig,
        *,
        runner_keys: HpkeKeyPair | None = None,
        tenant_keys: TenantKeyLookup | None = None,
        client: httpx.Client | None = None,
    ):
        self.config = config
        self._runner_keys = runner_keys
        self._tenant_keys = tenant_keys
        self._client = client or httpx.Client(follow_redirects=False, trust_env=config.trust_env)

    def close(self) -> None:
        self._client.close()

    def open_run(
        self, *, run_id: str, allowed_providers: Sequence[str], budgets: Budgets, payer_tenant_id: str | None
    ) -> RunLlm:
        return RunLlm(
            self,
            run_id=run_id,
            allowed_providers=allowed_providers,
            budgets=budgets,
            payer_tenant_id=payer_tenant_id,
        )

    def tenant_key(self, tenant_id: str | None, provider: str) -> SecretStr | None:
        """The payer's own key for ``provider``, or None when the payer has not stored one.

        A stored key that does not open is an error, not a reason to fall back to the operator's key:
        the run must not silently bill a credential the payer did not choose.
        """
        if tenant_id is None or self._tenant_keys is None:
            return None
        try:
            sealed = self._tenant_keys(tenant_id).get(provider)
        except Exception as exc:
            # Fail closed: without the payer's record the runner cannot know which key to use.
            logger.error("provider keys of tenant %s unreadable: %s", tenant_id, type(exc).__name__)
            raise LlmProviderError("the payer's provider keys cannot be read") from None
        if sealed is None:
            return None
        if self._runner_keys is None:
            raise LlmProviderError("this runner cannot open tenant provider keys (no runner key configured)")
        try:
            api_key = open_provider_key(
                self._runner_keys, SealedEnvelope.from_json(sealed), tenant_id=tenant_id, provider=provider
            )
        except EnvelopeError:
            raise LlmProviderError(
                f"the payer's sealed key for {provider} does not open on this runner"
            ) from None
        return SecretStr(api_key)

    def post(self, provider: ProviderConfig, api_key: SecretStr, body: dict[str, Any]) -> dict[str, Any]:
        """POST one chat completion; the parsed, key-scrubbed response or :class:`LlmProviderError`."""
        secret = api_key.get_secret_value()
        timeout = httpx.Timeout(provider.timeout_s, connect=min(10.0, provider.timeout_s))
        try:
            with self._client.stream(
                "POST",
                provider.completions_url,
                json=body,
                headers={"Authorization": f"Bearer {secret}", "Accept": "application/json"},
                timeout=timeout,
            ) as response:
                raw = bytearray()
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > provider.max_response_bytes:
                        raise LlmProviderError(
                            f"{provider.name} answered more than {provider.max_response_bytes} bytes"
                        )
                status = response.status_code
        except httpx.TimeoutException:
            raise LlmProviderError(f"{provider.name} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise LlmProviderError(f"{provider.name} could not be reached ({type(exc).__name__})") from None
        if status != 200:
            # The provider's error body is not forwarded: it may echo the request or the credential.
            raise LlmProviderError(f"{provider.name} answered HTTP {status}")
        try:
            parsed = json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError):
            raise LlmProviderError(f"{provider.name} answered something that is not JSON") from None
        if (
            not isinstance(parsed, dict)
            or not isinstance(parsed.get("choices"), list)
            or not parsed["choices"]
        ):
            raise LlmProviderError(f"{provider.name} answered something that is not a chat completion")
        first = parsed["choices"][0]
        if not isinstance(first, dict) or not isinstance(first.get("message"), dict):
            raise LlmProviderError(f"{provider.name} answered a completion without a message")
        parsed.setdefault("object", "chat.completion")
        if not isinstance(parsed.get("id"), str):
            parsed["id"] = "chatcmpl-bridge"
        return _scrub(parsed, secret)


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")
