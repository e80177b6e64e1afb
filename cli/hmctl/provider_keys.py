"""A tenant's own LLM provider key, sealed to the attested runner (``hmctl tenant set-provider-key``).

The command seals the key on this machine with :func:`hivemind.envelope.seal_provider_key` to a verified
runner's attested HPKE keys, bound to this tenant and this provider, so it opens only inside an attested
runner; the control plane stores the sealed envelope under :func:`provider_key_path` and never sees the
key (DESIGN §8: "one key per tenant"). Runs this tenant pays for then use it.
"""

from __future__ import annotations


def provider_key_path(provider: str) -> str:
    return f"/v1/tenant/provider-keys/{provider}"
