"""Invites: owner invites, derived invites that may only narrow, per-invite revocation (DESIGN §5, §16.8)."""

from __future__ import annotations

from hivemind.keys import unwrap_dek, wrap_key


def _post_invite(api, room, issuer, invite, **constraints):
    body = {"auth_hash": invite.auth_hash, "wrap": invite.wrap(room.dek), "constraints": constraints}
    return api.post(f"/v1/rooms/{room.room_id}/invites", token=issuer.token, json=body)


def test_an_invite_holder_gets_its_wrap_and_opens_the_room_key(api, hm, clock) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite_key(room)
    expires = clock() + 86_400
    body = _post_invite(
        api,
        room,
        alice,
        bob,
        uses=5,
        expires_at=expires,
        budgets={
            "timeout_s": 60,
            "llm_calls": 0,
            "tokens": 0,
            "memory_mb": 128,
        },
    ).ok(201)
    assert body["invite_id"] == bob.invite_id and body["parent_id"] is None
    assert (body["max_uses"], body["uses"], body["expires_at"]) == (5, 0, expires)
    wrap = api.get(f"/v1/rooms/{room.room_id}/key", token=bob.token).ok()
    assert wrap["bearer_id"] == bob.invite_id
    opened = unwrap_dek(
        wrap_key(bob.secret, room.room_id), wrap["wrapped"], room_id=room.room_id, bearer_id=bob.invite_id
    )
    assert opened == room.dek
    listed = api.get(f"/v1/rooms/{room.room_id}/invites", token=alice.token).ok()["invites"]
    assert [invite["invite_id"] for invite in listed] == [bob.invite_id]


def test_derived_invites_inherit_and_may_only_narrow(api, hm, store, clock) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    expires = clock() + 3600
    budgets = {"timeout_s": 60, "llm_calls": 2, "tokens": 1000, "memory_mb": 256}
    bob = hm.invite(room, uses=3, expires_at=expires, budgets=budgets)

    inherited = _post_invite(api, room, bob, hm.invite_key(room, parent=bob)).ok(201)
    assert inherited["parent_id"] == bob.invite_id
    assert (inherited["max_uses"], inherited["expires_at"], inherited["budgets"]) == (3, expires, budgets)

    narrower = _post_invite(
        api,
        room,
        bob,
        hm.invite_key(room, parent=bob),
        uses=1,
        expires_at=expires - 60,
        budgets={**budgets, "tokens": 10},
    ).ok(201)
    assert (narrower["max_uses"], narrower["budgets"]["tokens"]) == (1, 10)

    for widened, what in [
        ({"uses": 4}, "uses"),
        ({"expires_at": expires + 1}, "expires_at"),
        ({"budgets": {**budgets, "llm_calls": 3}}, "budgets.llm_calls"),
    ]:
        attempt = hm.invite_key(room, parent=bob)
        response = _post_invite(api, room, bob, attempt, **widened)
        assert (response.status, response.error) == (403, "invite_widens"), widened
        assert what in response.json()["message"]
        assert store.credentials.get(attempt.auth_hash) is None
        assert store.rooms.get_wrap(room.room_id, attempt.invite_id) is None


def test_uses_are_compared_with_what_the_parent_has_left(hm_lambda, lambda_api, store) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    bob = hm_lambda.invite(room, uses=2)
    store.credentials.consume_use(bob.auth_hash)
    response = _post_invite(lambda_api, room, bob, hm_lambda.invite_key(room, parent=bob), uses=2)
    assert response.error == "invite_widens"
    _post_invite(lambda_api, room, bob, hm_lambda.invite_key(room, parent=bob), uses=1).ok(201)
    store.credentials.consume_use(bob.auth_hash)
    response = _post_invite(lambda_api, room, bob, hm_lambda.invite_key(room, parent=bob))
    assert (response.status, response.error) == (403, "credential_exhausted")


def test_invite_refusals(hm_lambda, lambda_api, clock) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    other_room = hm_lambda.room(alice)
    stranger = hm_lambda.invite(other_room)
    mallory = hm_lambda.tenant("mallory")
    maxima = room.manifest.budgets.maxima.model_dump()
    cases = [
        (alice, {"expires_at": clock() - 1}, 400, "invalid_input"),
        (alice, {"budgets": {**maxima, "tokens": maxima["tokens"] + 1}}, 400, "budget_exceeds_room"),
        (alice, {"uses": 0}, 400, "invalid_input"),
        (stranger, {}, 404, "room_not_found"),
        (mallory, {}, 404, "room_not_found"),
    ]
    for issuer, constraints, status, code in cases:
        response = _post_invite(lambda_api, room, issuer, hm_lambda.invite_key(room), **constraints)
        assert (response.status, response.error) == (status, code), constraints
    taken = hm_lambda.invite(room)
    response = _post_invite(lambda_api, room, alice, taken)
    assert (response.status, response.error) == (409, "invite_exists")
    wrong_wrap = hm_lambda.invite_key(room)
    body = {"auth_hash": wrong_wrap.auth_hash, "wrap": "not base64!", "constraints": {}}
    response = lambda_api.post(f"/v1/rooms/{room.room_id}/invites", token=alice.token, json=body)
    assert (response.status, response.error) == (400, "invalid_input")


def test_revoking_an_invite_revokes_its_descendants_only(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite(room)
    carol = hm.invite(room, by=bob)
    dave = hm.invite(room, by=carol)
    erin = hm.invite(room)
    body = api.delete(f"/v1/rooms/{room.room_id}/invites/{carol.invite_id}", token=alice.token).ok()
    assert body["revoked"] == [carol.invite_id, dave.invite_id]
    for revoked in (carol, dave):
        response = api.get("/v1/whoami", token=revoked.token)
        assert (response.status, response.error) == (401, "credential_revoked")
        assert store.rooms.get_wrap(room.room_id, revoked.invite_id) is None
    for alive in (bob, erin):
        api.get(f"/v1/rooms/{room.room_id}/key", token=alive.token).ok()
    # Revoking again changes nothing.
    assert api.delete(f"/v1/rooms/{room.room_id}/invites/{carol.invite_id}", token=alice.token).ok() == {
        "revoked": []
    }
    events = api.get(f"/v1/rooms/{room.room_id}/audit", token=alice.token).ok()["events"]
    assert events[-1]["kind"] == "invite_revoked"
    assert events[-1]["details"]["revoked"] == [carol.invite_id, dave.invite_id]


def test_a_holder_may_revoke_its_own_line_but_not_others(api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    bob = hm.invite(room)
    carol = hm.invite(room, by=bob)
    erin = hm.invite(room)
    response = api.delete(f"/v1/rooms/{room.room_id}/invites/{erin.invite_id}", token=bob.token)
    assert (response.status, response.error) == (403, "not_your_invite")
    response = api.delete(f"/v1/rooms/{room.room_id}/invites/{bob.invite_id}", token=carol.token)
    assert (response.status, response.error) == (403, "not_your_invite")
    assert api.delete(f"/v1/rooms/{room.room_id}/invites/{carol.invite_id}", token=bob.token).ok() == {
        "revoked": [carol.invite_id]
    }
    response = api.delete(f"/v1/rooms/{room.room_id}/invites/{'0' * 16}", token=alice.token)
    assert (response.status, response.error) == (404, "invite_not_found")
    api.get("/v1/whoami", token=erin.token).ok()


def test_a_revoked_invite_cannot_derive(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice)
    bob = hm_lambda.invite(room)
    lambda_api.delete(f"/v1/rooms/{room.room_id}/invites/{bob.invite_id}", token=alice.token).ok()
    response = _post_invite(lambda_api, room, bob, hm_lambda.invite_key(room, parent=bob))
    assert (response.status, response.error) == (401, "credential_revoked")
