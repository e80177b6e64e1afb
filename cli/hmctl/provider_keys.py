"""A tenant's own LLM provider key, sealed to the attested runner (``hmctl tenant set-provider-key``).

The key is HPKE-sealed to a verified runner's attested HPKE public key with info
``b"hivemind-provider-key-v1|" + tenant_id + "|" + provider``, so it opens only inside an attested
runner, only for this tenant and this provider; the control plane stores the sealed envelope and never
sees the key (DESIGN §8: "one key per tenant"). Runs this tenant pays for then use it.
"""

from __future__ import annotations

from hivemind.attestation import VerifiedRunner
from hivemind.envelope import HpkePublicKeys, SealedEnvelope, seal_to
from hivemind.errors import InvalidInput

PROVIDER_KEY_INFO_PREFIX = b"hivemind-provider-key-v1|"
MAX_API_KEY_CHARS = 4096


def provider_key_path(provider: str) -> str:
    return f"/v1/tenant/provider-keys/{provider}"


def provider_key_info(tenant_id: str, provider: str) -> bytes:
    if not tenant_id or not provider or "|" in tenant_id or "|" in provider:
        raise InvalidInput("a provider key is bound to a non-empty tenant id and provider name")
    return PROVIDER_KEY_INFO_PREFIX + tenant_id.encode() + b"|" + provider.encode()


def seal_provider_key(
    runner: VerifiedRunner, *, tenant_id: str, provider: str, api_key: str
) -> SealedEnvelope:
    """Seal ``api_key`` to ``runner``'s attested keys; the runner refuses anything but a printable token."""
    if not api_key or len(api_key) > MAX_API_KEY_CHARS:
        raise InvalidInput(f"an API key is 1 to {MAX_API_KEY_CHARS} characters")
    if any(not 0x21 <= ord(character) <= 0x7E for character in api_key):
        raise InvalidInput("an API key is printable ASCII without spaces (check what you pasted)")
    return seal_to(
        HpkePublicKeys.from_suites(runner.hpke_public_keys),
        api_key.encode(),
        info=provider_key_info(tenant_id, provider),
    )
