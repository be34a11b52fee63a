from __future__ import annotations

import pytest

from airflow_papertrail.exceptions import OAuthError
from airflow_papertrail.oauth import Token
from airflow_papertrail.oauth.tokens import ASSUMED_EXPIRES_IN

NOW = 1_700_000_000.0


def test_expiry_is_absolute_and_unknown_members_are_ignored():
    t = Token.from_response(
        {
            "access_token": "at-1",
            "token_type": "bearer",
            "expires_in": 1800,
            "refresh_token": "rt-1",
            "scope": "a b",
            "x_new": {"n": 1},
        },
        now=NOW,
    )
    assert t.expires_at == NOW + 1800 and t.obtained_at == NOW
    assert (t.access_token, t.refresh_token, t.scope, t.token_type) == ("at-1", "rt-1", "a b", "Bearer")
    assert not t.expiry_assumed


@pytest.mark.parametrize("expires_in", [None, "soon", -5, float("nan"), True])
def test_missing_or_bad_expires_in_assumes_an_hour(expires_in):
    t = Token.from_response({"access_token": "a", "expires_in": expires_in}, now=NOW)
    assert t.expires_at == NOW + ASSUMED_EXPIRES_IN and t.expiry_assumed


def test_numeric_string_expires_in_is_honoured():
    assert Token.from_response({"access_token": "a", "expires_in": "60"}, now=NOW).expires_at == NOW + 60


def test_refresh_without_new_refresh_token_keeps_the_previous_one_and_scope():
    old = Token.from_response({"access_token": "a", "refresh_token": "rt-old", "scope": "s1"}, now=NOW)
    new = Token.from_response({"access_token": "b", "expires_in": 10}, now=NOW + 5, previous=old)
    assert new.refresh_token == "rt-old" and new.scope == "s1"


def test_missing_scope_means_requested_scope():
    assert Token.from_response({"access_token": "a"}, now=NOW, requested_scope="x y").scope == "x y"


@pytest.mark.parametrize(
    "payload",
    [[], "text", {}, {"access_token": ""}, {"access_token": 5}, {"access_token": "a", "token_type": "mac"}],
)
def test_malformed_token_responses_raise(payload):
    with pytest.raises(OAuthError) as err:
        Token.from_response(payload, now=NOW, status=200)
    assert err.value.error == "invalid_response"


@pytest.mark.parametrize(
    ("leeway", "now", "expected"),
    [(120, NOW + 3000, False), (120, NOW + 3480, True), (0, NOW + 3599, False), (0, NOW + 3600, True)],
)
def test_expires_within_leeway(leeway, now, expected):
    t = Token.from_response({"access_token": "a", "expires_in": 3600}, now=NOW)
    assert t.expires_within(leeway, now) is expected


def test_round_trip_and_repr_hide_values():
    t = Token.from_response(
        {"access_token": "access-VALUE", "refresh_token": "refresh-VALUE", "expires_in": 5}, now=NOW
    )
    assert Token.from_dict(t.to_dict()) == t
    assert "VALUE" not in repr(t) and "VALUE" not in str(t)


def test_expires_in_zero_is_no_expiry_information():
    """A token dead on arrival cannot be what the server meant: 0 is treated like a missing expires_in
    (assumed hour, expiry_assumed), so every call does not refresh again (token-custody.md)."""
    t = Token.from_response({"access_token": "a", "expires_in": 0}, now=NOW)
    assert t.expiry_assumed and t.expires_at == NOW + 3600


@pytest.mark.parametrize(
    ("lifetime", "leeway", "effective"), [(3600, 120, 120), (300, 120, 120), (60, 120, 30), (5, 120, 2.5), (0, 120, 0)]
)
def test_effective_leeway_is_bounded_by_half_the_lifetime(lifetime, leeway, effective):
    t = Token(access_token="a", token_type="Bearer", obtained_at=NOW, expires_at=NOW + lifetime)
    assert t.refresh_leeway(leeway) == effective
    assert not t.due_for_refresh(leeway, NOW + lifetime / 2 - 0.01) or lifetime == 0
    assert t.due_for_refresh(leeway, NOW + lifetime - effective)


@pytest.mark.parametrize("member", ["refresh_token_expires_in", "x_refresh_token_expires_in"])
def test_refresh_token_expiry_is_absolute_and_round_trips(member):
    t = Token.from_response({"access_token": "at-1", "refresh_token": "rt-1", member: "8726400"}, now=NOW)
    assert t.refresh_expires_at == NOW + 8_726_400
    assert Token.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("value", [None, "soon", -5, 0, float("inf"), True, [1]])
def test_unusable_refresh_token_expiry_is_unknown(value):
    t = Token.from_response(
        {"access_token": "at-1", "refresh_token": "rt-1", "refresh_token_expires_in": value}, now=NOW
    )
    assert t.refresh_expires_at is None


def test_refresh_token_expiry_kept_when_not_rotated_and_dropped_with_a_new_token():
    first = Token.from_response(
        {"access_token": "at-1", "refresh_token": "rt-1", "refresh_token_expires_in": 100}, now=NOW
    )
    kept = Token.from_response({"access_token": "at-2"}, now=NOW + 10, previous=first)
    assert kept.refresh_token == "rt-1" and kept.refresh_expires_at == NOW + 100
    rotated = Token.from_response({"access_token": "at-3", "refresh_token": "rt-2"}, now=NOW + 20, previous=first)
    assert rotated.refresh_expires_at is None  # a new refresh token whose lifetime nobody stated
    assert (
        Token.from_response({"access_token": "at-4", "refresh_token_expires_in": 5}, now=NOW).refresh_expires_at is None
    )
    # grants stored before the field existed
    legacy = {k: v for k, v in first.to_dict().items() if k != "refresh_expires_at"}
    assert Token.from_dict(legacy).refresh_expires_at is None
