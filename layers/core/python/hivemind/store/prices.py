"""Prices: micro-USD per million prompt and completion tokens per provider model, and the runner fee
(DESIGN §11).

A missing price is an error (``price_missing``), never "free": a run cannot be held or settled against a
model or fee nobody priced. Costs round up to the next micro-USD, so rounding never undercharges.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field

from hivemind.errors import InvalidInput, ServiceUnavailable
from hivemind.models import StrictModel, UnixSeconds
from hivemind.store.base import Clock, Record, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import TableRole

# The runner fee lives in the same table under a reserved key no LLM provider can take.
_FEE_PROVIDER = "#runner"
_FEE_MODEL = "fee"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$"
_PER_MILLION = 1_000_000


class TokenPrice(Record):
    provider: str = Field(pattern=_NAME)
    model: str = Field(pattern=_NAME)
    prompt_per_million: int = Field(ge=0, description="micro-USD per million prompt tokens")
    completion_per_million: int = Field(ge=0, description="micro-USD per million completion tokens")
    updated_at: UnixSeconds
    updated_by: str = Field(min_length=1, max_length=80)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """micro-USD for this many tokens, rounded up."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise InvalidInput("token counts are never negative")
        return _ceil_div(
            prompt_tokens * self.prompt_per_million + completion_tokens * self.completion_per_million,
            _PER_MILLION,
        )


class RunnerFee(Record):
    per_second: int = Field(ge=0, description="micro-USD per second of runner time")
    updated_at: UnixSeconds
    updated_by: str = Field(min_length=1, max_length=80)


class LlmUsage(StrictModel):
    """Tokens one run spent on one provider model."""

    provider: str
    model: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _missing(what: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"no price for {what}; an operator must set one", code="price_missing")


class PriceRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.PRICES)
        self._clock = clock

    def set_price(
        self,
        provider: str,
        model: str,
        *,
        prompt_per_million: int,
        completion_per_million: int,
        updated_by: str,
    ) -> TokenPrice:
        price = TokenPrice(
            provider=provider,
            model=model,
            prompt_per_million=prompt_per_million,
            completion_per_million=completion_per_million,
            updated_at=self._clock(),
            updated_by=updated_by,
        )
        self._table.put(price.to_item())
        return price

    def remove_price(self, provider: str, model: str) -> bool:
        return self._table.delete({"provider": provider, "model": model}) is not None

    def get_price(self, provider: str, model: str) -> TokenPrice:
        item = self._table.get({"provider": provider, "model": model})
        if item is None or provider == _FEE_PROVIDER:
            raise _missing(f"{provider}/{model}")
        return TokenPrice.from_item(item)

    def prices_for(self, provider: str) -> list[TokenPrice]:
        """Every priced model of ``provider``; none at all is ``price_missing``."""
        if provider == _FEE_PROVIDER:
            raise _missing(provider)
        items = list(
            self._table.query_all(
                key_condition="provider = :provider",
                values={":provider": provider},
                scope={"provider": provider},
            )
        )
        if not items:
            raise _missing(f"any model of {provider}")
        return [TokenPrice.from_item(item) for item in items]

    def list_prices(self) -> list[TokenPrice]:
        """Every token price (operator listing; the table is small)."""
        prices: list[TokenPrice] = []
        cursor: str | None = None
        while True:
            items, cursor = self._table.scan_page(cursor=cursor)
            prices += [TokenPrice.from_item(item) for item in items if item["provider"] != _FEE_PROVIDER]
            if cursor is None:
                return sorted(prices, key=lambda price: (price.provider, price.model))

    def set_runner_fee(self, per_second: int, *, updated_by: str) -> RunnerFee:
        fee = RunnerFee(per_second=per_second, updated_at=self._clock(), updated_by=updated_by)
        self._table.put({**fee.to_item(), "provider": _FEE_PROVIDER, "model": _FEE_MODEL})
        return fee

    def runner_fee(self) -> RunnerFee:
        item = self._table.get({"provider": _FEE_PROVIDER, "model": _FEE_MODEL})
        if item is None:
            raise _missing("runner time")
        return RunnerFee.from_item(item)

    def hold_for(self, *, providers: Iterable[str], token_budget: int, timeout_s: int) -> int:
        """The hold for a run (DESIGN §11): token budget at the highest price any allowed model charges,
        plus the runner fee for the whole timeout."""
        if token_budget < 0 or timeout_s < 0:
            raise InvalidInput("budgets are never negative")
        highest = 0
        if token_budget > 0:
            prices = [price for provider in sorted(set(providers)) for price in self.prices_for(provider)]
            if not prices:
                raise _missing("the run's token budget (no LLM provider is allowed)")
            highest = max(max(price.prompt_per_million, price.completion_per_million) for price in prices)
        return _ceil_div(token_budget * highest, _PER_MILLION) + self.runner_fee().per_second * timeout_s

    def cost_of(self, usage: Iterable[LlmUsage], *, runner_seconds: int) -> int:
        """What a finished run actually costs: every model's tokens at its price plus runner time."""
        if runner_seconds < 0:
            raise InvalidInput("runner time is never negative")
        total = self.runner_fee().per_second * runner_seconds
        for line in usage:
            total += self.get_price(line.provider, line.model).cost(
                line.prompt_tokens, line.completion_tokens
            )
        return total
