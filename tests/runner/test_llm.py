"""LLM egress against a loopback OpenAI-compatible server: allow-list, budgets before the call,
metering, credentials (operator and tenant keys sealed to the runner), and what reaches the agent."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from support.llm_server import FakeLlmServer

from hivemind.encoding import b64decode, b64encode
from hivemind.envelope import HpkeKeyPair, provider_key_info, seal_provider_key, seal_to
from hivemind.errors import InvalidInput, StoreError
from hivemind.models import Budgets, Stage
from hivemind_agent import Bridge
from hivemind_agent.errors import BridgeError, BudgetExhausted, Denied
from hivemind_runner.bridge import BridgeServer, StageServices, StageSession, tool_call_chain
from hivemind_runner.llm import (
    InvalidLlmRequest,
    LlmBudgetExceeded,
    LlmConfig,
    LlmGateway,
    LlmProviderError,
    ProviderConfig,
    ProviderNotAllowed,
    RunLlm,
)

OPERATOR_KEY = "sk-operator-secret-0123456789"
TENANT_KEY = "sk-tenant-own-key-9876543210"
RUNNER_KEYS = HpkeKeyPair.from_seed(bytes(range(32)))
MESSAGES = [{"role": "user", "content": "top products by orders"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLlmServer]:
    with FakeLlmServer() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(server: FakeLlmServer) -> None:
    server.requests.clear()
    server._queue.clear()


def config(server: FakeLlmServer, *, operator_key: str | None = OPERATOR_KEY, **extra: Any) -> LlmConfig:
    provider = ProviderConfig(
        name="local",
        base_url=server.base_url,
        api_key=operator_key,
        default_model="small-1",
        default_max_tokens=50,
        **extra,
    )
    return LlmConfig(providers={"local": provider})


def run_meter(
    gateway: LlmGateway,
    *,
    calls: int = 5,
    tokens: int = 10_000,
    providers: tuple[str, ...] = ("local",),
    payer: str | None = "tn_payer1",
) -> RunLlm:
    return gateway.open_run(
        run_id="run_llm1",
        allowed_providers=providers,
        budgets=Budgets(timeout_s=60, llm_calls=calls, tokens=tokens, memory_mb=256),
        payer_tenant_id=payer,
    )


def tenant_keys(keys: Mapping[str, Mapping[str, str]]) -> Any:
    return lambda tenant_id: keys.get(tenant_id, {})


# --- routing and the allow-list ------------------------------------------------------------------


def test_a_call_reaches_the_provider_with_the_operator_key(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)))
    server.reply("tea: 41", usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    completion = meter.complete(Stage.QUERY, {"messages": MESSAGES, "temperature": 0})
    assert completion["choices"][0]["message"]["content"] == "tea: 41"
    assert completion["model"] == "local/small-1"
    (request,) = server.requests
    assert request.authorization == f"Bearer {OPERATOR_KEY}"
    assert request.body["model"] == "small-1"
    assert request.body["temperature"] == 0
    assert request.body["stream"] is False


def test_model_names_a_provider_and_a_model(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)))
    meter.complete(Stage.QUERY, {"messages": MESSAGES, "model": "local/org/large-2"})
    assert server.requests[-1].body["model"] == "org/large-2"
    meter.complete(Stage.QUERY, {"messages": MESSAGES, "model": "bare-model"})
    assert server.requests[-1].body["model"] == "bare-model"


@pytest.mark.parametrize(
    ("model", "providers"),
    [("elsewhere/gpt", ("local",)), (None, ()), ("local/small-1", ("openrouter",))],
    ids=["other-provider", "room-allows-none", "not-in-allow-list"],
)
def test_providers_outside_the_allow_list_are_refused_before_any_call(
    server: FakeLlmServer, model: str | None, providers: tuple[str, ...]
) -> None:
    meter = run_meter(LlmGateway(config(server)), providers=providers)
    body: dict[str, Any] = {"messages": MESSAGES}
    if model is not None:
        body["model"] = model
    with pytest.raises(ProviderNotAllowed):
        meter.complete(Stage.QUERY, body)
    assert server.requests == []
    assert meter.remaining_calls() == 5


def test_a_room_provider_the_runner_cannot_reach_is_not_allowed(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)), providers=("tinfoil", "local"))
    with pytest.raises(ProviderNotAllowed, match="not configured"):
        meter.complete(Stage.QUERY, {"messages": MESSAGES, "model": "tinfoil/llama"})
    # Without a model the first configured provider of the allow-list serves the call.
    meter.complete(Stage.QUERY, {"messages": MESSAGES})
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"plugins": [{"id": "web"}]},
        {"provider": {"data_collection": "allow"}},
        {"stream": True},
        {"n": 3},
        {"tools": [{"type": "web_search"}]},
        {"max_tokens": 0},
        {"messages": []},
        {"model": "local/" + "m" * 200},
    ],
    ids=["plugins", "routing", "stream", "n", "builtin-tool", "zero-max-tokens", "no-messages", "long-model"],
)
def test_requests_that_reach_beyond_the_provider_are_refused(
    server: FakeLlmServer, extra: dict[str, Any]
) -> None:
    meter = run_meter(LlmGateway(config(server)))
    with pytest.raises(InvalidLlmRequest):
        meter.complete(Stage.QUERY, {"messages": MESSAGES, **extra})
    assert server.requests == []


def test_openrouter_web_search_models_are_refused(server: FakeLlmServer) -> None:
    provider = ProviderConfig(name="openrouter", base_url=server.base_url, api_key=OPERATOR_KEY)
    meter = run_meter(LlmGateway(LlmConfig(providers={"openrouter": provider})), providers=("openrouter",))
    with pytest.raises(InvalidLlmRequest, match="web-search"):
        meter.complete(Stage.QUERY, {"messages": MESSAGES, "model": "openrouter/openai/gpt-4o:online"})
    assert server.requests == []


def test_function_tool_calls_pass_through(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)))
    server.tool_call("run_sql", {"query": "SELECT 1"})
    tools = [{"type": "function", "function": {"name": "run_sql", "parameters": {"type": "object"}}}]
    completion = meter.complete(Stage.QUERY, {"messages": MESSAGES, "tools": tools, "tool_choice": "auto"})
    call = completion["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"query": "SELECT 1"}
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert server.requests[0].body["tools"] == tools


# --- budgets ------------------------------------------------------------------------------------------


def test_the_call_budget_is_enforced_before_the_call(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)), calls=2)
    meter.complete(Stage.SCOPE, {"messages": MESSAGES})
    meter.complete(Stage.QUERY, {"messages": MESSAGES})
    with pytest.raises(LlmBudgetExceeded, match="call budget"):
        meter.complete(Stage.MEDIATOR, {"messages": MESSAGES})
    assert len(server.requests) == 2


def test_the_token_budget_is_enforced_before_the_call(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)), tokens=5)
    with pytest.raises(LlmBudgetExceeded, match="token budget"):
        meter.complete(Stage.QUERY, {"messages": [{"role": "user", "content": "x" * 400}]})
    assert server.requests == []
    assert meter.remaining_calls() == 5


def test_max_tokens_is_clamped_to_what_is_left(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)), tokens=100)
    meter.complete(Stage.QUERY, {"messages": MESSAGES, "max_tokens": 5000})
    sent = server.requests[0].body["max_tokens"]
    assert 0 < sent < 100
    meter.complete(Stage.QUERY, {"messages": MESSAGES, "max_completion_tokens": 3})
    assert server.requests[1].body["max_completion_tokens"] == 3
    assert "max_tokens" not in server.requests[1].body


def test_actual_usage_is_what_the_budget_is_charged(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)), tokens=1000)
    server.reply("ok", usage={"prompt_tokens": 300, "completion_tokens": 200, "total_tokens": 500})
    meter.complete(Stage.QUERY, {"messages": MESSAGES, "max_tokens": 400})
    assert meter.remaining_tokens() == 500
    assert meter.remaining_calls() == 4


def test_a_completion_without_usage_is_charged_its_reservation(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)), tokens=1000)
    server.reply("ok", omit_usage=True)
    completion = meter.complete(Stage.QUERY, {"messages": MESSAGES, "max_tokens": 40})
    usage = completion["usage"]
    assert usage["completion_tokens"] == 40 and usage["prompt_tokens"] > 0
    assert meter.remaining_tokens() == 1000 - usage["total_tokens"]


def test_usage_is_metered_per_stage_and_per_model(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)))
    server.reply("a", usage={"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11})
    server.reply("b", usage={"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22})
    server.reply("c", usage={"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33})
    meter.complete(Stage.SCOPE, {"messages": MESSAGES})
    meter.complete(Stage.QUERY, {"messages": MESSAGES})
    meter.complete(Stage.QUERY, {"messages": MESSAGES, "model": "local/other"})
    scope, query = meter.stage_usage(Stage.SCOPE), meter.stage_usage(Stage.QUERY)
    assert (scope.calls, scope.prompt_tokens, scope.completion_tokens) == (1, 10, 1)
    assert (query.calls, query.prompt_tokens, query.completion_tokens) == (2, 50, 5)
    assert meter.stage_usage(Stage.MEDIATOR).calls == 0
    assert meter.provider_usage() == [
        {"provider": "local", "model": "other", "prompt_tokens": 30, "completion_tokens": 3},
        {"provider": "local", "model": "small-1", "prompt_tokens": 30, "completion_tokens": 3},
    ]


# --- provider failures ----------------------------------------------------------------------------------


def test_a_provider_error_counts_the_call_and_forwards_nothing(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)))
    server.fail(500, body=f'{{"error": "bad key {OPERATOR_KEY}"}}'.encode())
    with pytest.raises(LlmProviderError) as failed:
        meter.complete(Stage.QUERY, {"messages": MESSAGES})
    assert "HTTP 500" in failed.value.message and OPERATOR_KEY not in failed.value.message
    assert meter.remaining_calls() == 4
    assert meter.stage_usage(Stage.QUERY).calls == 1


@pytest.mark.parametrize("body", [b"not json", b'{"choices": []}', b'{"choices": [{"text": "x"}]}', b"[1]"])
def test_an_answer_that_is_not_a_completion_is_a_provider_error(server: FakeLlmServer, body: bytes) -> None:
    meter = run_meter(LlmGateway(config(server)))
    server.raw(body)
    with pytest.raises(LlmProviderError):
        meter.complete(Stage.QUERY, {"messages": MESSAGES})


def test_an_oversized_answer_is_a_provider_error(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server, max_response_bytes=1024)))
    server.reply("x " * 2000)
    with pytest.raises(LlmProviderError, match="more than 1024 bytes"):
        meter.complete(Stage.QUERY, {"messages": MESSAGES})


def test_an_unreachable_provider_is_a_provider_error() -> None:
    provider = ProviderConfig(
        name="local", base_url="http://127.0.0.1:9/v1", api_key=OPERATOR_KEY, default_model="m"
    )
    meter = run_meter(LlmGateway(LlmConfig(providers={"local": provider})))
    with pytest.raises(LlmProviderError, match="could not be reached"):
        meter.complete(Stage.QUERY, {"messages": MESSAGES})
    assert meter.remaining_calls() == 4


def test_a_reflected_key_is_scrubbed_from_the_answer(server: FakeLlmServer) -> None:
    meter = run_meter(LlmGateway(config(server)))
    server.echo_authorization()
    completion = meter.complete(Stage.QUERY, {"messages": MESSAGES})
    text = json.dumps(completion)
    assert OPERATOR_KEY not in text
    assert "[REDACTED]" in completion["choices"][0]["message"]["content"]


# --- tenant keys sealed to the runner ------------------------------------------------------------------


def sealed_tenant_key(
    tenant_id: str = "tn_payer1",
    provider: str = "local",
    key: str = TENANT_KEY,
    runner: HpkeKeyPair = RUNNER_KEYS,
) -> str:
    sealed = seal_provider_key(runner.public_keys(), tenant_id=tenant_id, provider=provider, api_key=key)
    return sealed.to_json()


def test_the_payers_own_key_is_preferred(server: FakeLlmServer) -> None:
    gateway = LlmGateway(
        config(server),
        runner_keys=RUNNER_KEYS,
        tenant_keys=tenant_keys({"tn_payer1": {"local": sealed_tenant_key()}}),
    )
    meter = run_meter(gateway)
    meter.complete(Stage.QUERY, {"messages": MESSAGES})
    assert server.requests[0].authorization == f"Bearer {TENANT_KEY}"
    # The payer is billed by the provider directly: nothing for settlement to charge.
    assert meter.provider_usage() == []
    assert meter.stage_usage(Stage.QUERY).calls == 1
    other_payer = run_meter(gateway, payer="tn_other1")
    other_payer.complete(Stage.QUERY, {"messages": MESSAGES})
    assert server.requests[1].authorization == f"Bearer {OPERATOR_KEY}"


def test_a_tenant_key_is_usable_without_an_operator_key(server: FakeLlmServer) -> None:
    gateway = LlmGateway(
        config(server, operator_key=None),
        runner_keys=RUNNER_KEYS,
        tenant_keys=tenant_keys({"tn_payer1": {"local": sealed_tenant_key()}}),
    )
    run_meter(gateway).complete(Stage.QUERY, {"messages": MESSAGES})
    assert server.requests[0].authorization == f"Bearer {TENANT_KEY}"
    with pytest.raises(ProviderNotAllowed, match="no operator key"):
        run_meter(gateway, payer="tn_other1").complete(Stage.QUERY, {"messages": MESSAGES})


def test_a_broken_tenant_key_fails_closed_instead_of_using_the_operator_key(server: FakeLlmServer) -> None:
    sealed = json.loads(sealed_tenant_key())
    raw = bytearray(b64decode(sealed["ct"]))
    raw[0] ^= 1
    sealed["ct"] = b64encode(bytes(raw))
    gateway = LlmGateway(
        config(server),
        runner_keys=RUNNER_KEYS,
        tenant_keys=tenant_keys({"tn_payer1": {"local": json.dumps(sealed)}}),
    )
    with pytest.raises(LlmProviderError, match="does not open"):
        run_meter(gateway).complete(Stage.QUERY, {"messages": MESSAGES})
    assert server.requests == []


def test_an_unreadable_tenant_record_fails_closed(server: FakeLlmServer) -> None:
    def lookup(tenant_id: str) -> Mapping[str, str]:
        raise StoreError("dynamodb unavailable")

    gateway = LlmGateway(config(server), runner_keys=RUNNER_KEYS, tenant_keys=lookup)
    with pytest.raises(LlmProviderError, match="cannot be read"):
        run_meter(gateway).complete(Stage.QUERY, {"messages": MESSAGES})
    assert server.requests == []


def test_the_opened_tenant_key_is_held_as_a_secret() -> None:
    gateway = LlmGateway(
        LlmConfig(providers={}),
        runner_keys=RUNNER_KEYS,
        tenant_keys=tenant_keys({"tn_payer1": {"local": sealed_tenant_key()}}),
    )
    opened = gateway.tenant_key("tn_payer1", "local")
    assert opened is not None and opened.get_secret_value() == TENANT_KEY
    assert TENANT_KEY not in repr(opened)
    assert gateway.tenant_key("tn_payer1", "openrouter") is None
    assert gateway.tenant_key("tn_other1", "local") is None


def _flipped(sealed_json: str, field: str) -> str:
    sealed = json.loads(sealed_json)
    raw = bytearray(b64decode(sealed[field]))
    raw[-1] ^= 0x01
    sealed[field] = b64encode(bytes(raw))
    return json.dumps(sealed)


STORED_KEYS_THAT_DO_NOT_OPEN = {
    "flipped-enc": lambda: _flipped(sealed_tenant_key(), "enc"),
    "flipped-ct": lambda: _flipped(sealed_tenant_key(), "ct"),
    # Another tenant's sealed key copied onto this record, or one sealed for another provider.
    "other-tenant": lambda: sealed_tenant_key(tenant_id="tn_other1"),
    "other-provider": lambda: sealed_tenant_key(provider="openrouter"),
    "other-runner": lambda: sealed_tenant_key(runner=HpkeKeyPair.from_seed(bytes(32))),
    "not-an-envelope": lambda: "{}",
    "not-a-token": lambda: seal_to(
        RUNNER_KEYS.public_keys(), b"a b", info=provider_key_info("tn_payer1", "local")
    ).to_json(),
}


@pytest.mark.parametrize("stored", list(STORED_KEYS_THAT_DO_NOT_OPEN))
def test_a_tenant_key_that_does_not_open_here_fails_closed(stored: str) -> None:
    gateway = LlmGateway(
        LlmConfig(providers={}),
        runner_keys=RUNNER_KEYS,
        tenant_keys=tenant_keys({"tn_payer1": {"local": STORED_KEYS_THAT_DO_NOT_OPEN[stored]()}}),
    )
    with pytest.raises(LlmProviderError, match="does not open on this runner"):
        gateway.tenant_key("tn_payer1", "local")


# --- configuration ----------------------------------------------------------------------------------------


def test_config_from_env() -> None:
    environ = {
        "HIVEMIND_LLM_OPENROUTER_API_KEY": "sk-or",
        "HIVEMIND_LLM_OPENROUTER_DEFAULT_MODEL": "openai/gpt-4o-mini",
        "HIVEMIND_LLM_PROVIDERS": json.dumps({"vllm-local": {"base_url": "http://127.0.0.1:8000/v1/"}}),
        "HIVEMIND_LLM_VLLM_LOCAL_API_KEY": "sk-vllm",
    }
    loaded = LlmConfig.from_env(environ)
    assert set(loaded.providers) == {"openrouter", "tinfoil", "vllm-local"}
    openrouter = loaded.providers["openrouter"]
    assert openrouter.completions_url == "https://openrouter.ai/api/v1/chat/completions"
    assert openrouter.api_key is not None and openrouter.api_key.get_secret_value() == "sk-or"
    assert openrouter.default_model == "openai/gpt-4o-mini"
    assert loaded.providers["tinfoil"].api_key is None
    assert loaded.providers["vllm-local"].base_url == "http://127.0.0.1:8000/v1"
    assert "sk-or" not in repr(loaded)


@pytest.mark.parametrize(
    "url",
    ["http://llm.example.com/v1", "ftp://x/v1", "https://user:pw@llm.example.com/v1", "https://h/v1?k=1"],
)
def test_keys_only_travel_over_tls(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        ProviderConfig(name="remote", base_url=url)
    with pytest.raises(InvalidInput):
        LlmConfig.from_env({"HIVEMIND_LLM_PROVIDERS": json.dumps({"remote": {"base_url": url}})})


# --- through the bridge -----------------------------------------------------------------------------------


def test_agents_reach_the_llm_through_the_bridge_without_seeing_the_key(
    server: FakeLlmServer, tmp_path: Path
) -> None:
    meter = run_meter(LlmGateway(config(server)), calls=2)
    services = StageServices(input_document={"role": "mediator"}, llm=meter, llm_allowed=True)
    session = StageSession(
        run_id="run_llm1",
        stage=Stage.MEDIATOR,
        services=services,
        chain=tool_call_chain(max_tool_calls=10, max_log_lines=10),
    )
    with BridgeServer(session, tmp_path / "bridge.sock"):
        bridge = Bridge(str(tmp_path / "bridge.sock"), session.token, "mediator")
        server.echo_authorization()
        completion = bridge.llm.chat(MESSAGES, model="local/small-1", temperature=0)
        assert completion.model == "local/small-1"
        assert OPERATOR_KEY not in json.dumps(dict(completion.raw))
        assert completion.usage.total_tokens > 0
        server.fail(503)
        with pytest.raises(BridgeError) as failed:
            bridge.llm.chat(MESSAGES)
        assert (failed.value.code, failed.value.status) == ("llm_provider_error", 502)
        with pytest.raises(BudgetExhausted) as spent:
            bridge.llm.chat(MESSAGES)
        assert (spent.value.code, spent.value.status) == ("budget_exceeded", 429)
        with pytest.raises(Denied) as other:
            bridge.llm.chat(MESSAGES, model="elsewhere/x")
        assert other.value.code == "provider_not_allowed"
    assert session.tool_counts == {"llm": 4}
    assert len(server.requests) == 2
