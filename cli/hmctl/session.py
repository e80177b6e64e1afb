"""The state of one ``hmctl`` invocation: the profile store, the chosen profile, API clients, the clock.

Commands reach it through the click context (:func:`app_state`); tests inject their own
(``CliRunner().invoke(app, args, obj=AppState(...))``), e.g. with an ``httpx.MockTransport``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import typer

from hivemind.tokens import Secret
from hmctl.client import ApiClient
from hmctl.profiles import Profile, ProfileStore


def _now() -> int:
    return int(time.time())


@dataclass
class AppState:
    profile_name: str | None = None
    store: ProfileStore = field(default_factory=ProfileStore.from_environment)
    transport: httpx.BaseTransport | None = None
    clock: Callable[[], int] = _now
    sleep: Callable[[float], None] = time.sleep

    def profile(self) -> Profile:
        return self.store.load(self.profile_name)

    def api(self, service: str, secret: Secret | None, *, payer: Secret | None = None) -> ApiClient:
        """A client for ``service`` authenticated by ``secret``; ``payer`` pays for runs it submits."""
        return ApiClient.for_secret(service, secret, payer=payer, transport=self.transport, sleep=self.sleep)

    def profile_api(self, profile: Profile) -> ApiClient:
        """A client for the profile's service, authenticated by its key (if it has one)."""
        return self.api(profile.service, profile.secret() if profile.key is not None else None)


def app_state(ctx: typer.Context) -> AppState:
    state = ctx.find_object(AppState)
    if state is None:
        state = ctx.ensure_object(AppState)
    return state
