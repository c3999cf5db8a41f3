"""brokerd.policy: durations, tables, the strictest-wins merge, and each decision on a fake clock."""

from __future__ import annotations

import tomllib

import pytest

from brokerd.errors import ConfigError
from brokerd.policy import (
    Approvals,
    CallerIdentity,
    SessionPolicy,
    background_mode,
    flag_keys,
    idle_deadline,
    idle_expired,
    load_policy_book,
    login_needed_at,
    may_refresh,
    parse_duration,
    past_max_age,
    serve_limit,
    warn_at,
)

H = 3600.0
M = 60.0


class FakeClock:
    """Wall time that moves only when the test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.t += seconds


CONFIG = """
[daemon]
warn_before = "10m"
background_login = "notify"

[policy."https://auth.example.com/"]
confirm = true
confirm_ttl = "1h"
max_session_age = "12h"
idle_logout = "8h"

[policy."https://dev.example.com"]
background_login = "browser"

[profiles.prod]
oidc-issuer-url = "https://auth.example.com"
oidc-client-id = "kube_login"
max_session_age = "10h"
confirm_ttl = "2h"
refresh_token_lifetime = "90m"
warn_before = "30m"
"""


@pytest.mark.parametrize("text, seconds", [("12h", 12 * H), ("10m", 10 * M), ("90s", 90.0), ("1h30m", 90 * M),
                                           ("2d", 48 * H), ("0.5h", 30 * M), (" 8H ", 8 * H), (45, 45.0),
                                           (2.5, 2.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("bad", ["", "12", "h", "12x", "1h 30m", "-5m", "m10", "1h30", True, -3, None, [1]])
def test_bad_durations_are_one_clear_error(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "[policy.\"x\"] idle_logout")
    text = str(info.value)
    assert text.startswith("[policy.\"x\"] idle_logout: ")
    assert "\n" not in text


def test_tables_merge_strictest_wins() -> None:
    book = load_policy_book(tomllib.loads(CONFIG), "config.toml")
    # The issuer table matches with or without a trailing slash; daemon defaults apply too.
    plain = book.for_session("https://auth.example.com")
    assert plain == SessionPolicy(confirm=True, confirm_ttl=H, max_session_age=12 * H, idle_logout=8 * H,
                                  warn_before=10 * M, background_login="notify")
    prod = book.for_session("https://auth.example.com/", "prod")
    assert prod.max_session_age == 10 * H  # the shorter age wins
    assert prod.confirm_ttl == H  # a profile cannot make the issuer's confirmations last longer
    assert prod.warn_before == 30 * M  # the earlier warning
    assert prod.refresh_token_lifetime == 90 * M
    assert prod.confirm
    # "browser" for one issuer cannot undo the daemon's "notify" (no surprise tabs unless everything agrees).
    assert book.for_session("https://dev.example.com").background_login == "notify"
    assert book.for_session("https://other.example.com") == SessionPolicy(warn_before=10 * M,
                                                                         background_login="notify")
    assert flag_keys(tomllib.loads(CONFIG)["profiles"]["prod"]) == {
        "oidc-issuer-url": "https://auth.example.com", "oidc-client-id": "kube_login"}


@pytest.mark.parametrize("text, message", [
    ('[policy."https://a"]\nconfirm = "yes"', 'confirm must be true or false'),
    ('[policy."https://a"]\nmax_session_age = "forever"', 'max_session_age: expected a duration'),
    ('[policy."https://a"]\nconfrim = true', "unknown setting(s) confrim"),
    ('[daemon]\nbackground_login = "popup"', 'background_login must be "notify", "browser" or "refuse"'),
    ('policy = 3', "[policy] must hold one table per issuer"),
    ('[policy."https://a"]\nidle_logout = "0m"', "idle_logout: must be longer than 0 (leave it out for no limit)"),
    ('[policy]\n"https://a" = 1', 'must be a table'),
])
def test_bad_tables_say_where(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_book(tomllib.loads(text), "config.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("config.toml: ")


def test_max_session_age_ends_serving_and_refreshing() -> None:
    clock = FakeClock()
    policy = SessionPolicy(max_session_age=12 * H)
    logged_in = clock.now()
    token_exp = logged_in + 13 * H  # the provider issued for longer than the session may live
    assert serve_limit(policy, logged_in, token_exp) == logged_in + 12 * H
    assert serve_limit(policy, logged_in, logged_in + H) == logged_in + H
    clock.advance(12 * H - 1)
    assert not past_max_age(policy, logged_in, clock.now())
    assert may_refresh(policy, logged_in, clock.now())
    clock.advance(1)
    assert past_max_age(policy, logged_in, clock.now())
    assert not may_refresh(policy, logged_in, clock.now())
    # Unset: no end.
    assert serve_limit(SessionPolicy(), logged_in, token_exp) == token_exp
    assert not past_max_age(SessionPolicy(), logged_in, clock.now() + 1000 * H)


def test_idle_logout_counts_from_the_last_token_served() -> None:
    clock = FakeClock()
    policy = SessionPolicy(idle_logout=8 * H)
    served = clock.now()
    assert idle_deadline(policy, served) == served + 8 * H
    clock.advance(8 * H - 1)
    assert not idle_expired(policy, served, clock.now())
    served = clock.now()  # a token served resets the count
    clock.advance(8 * H - 1)
    assert not idle_expired(policy, served, clock.now())
    clock.advance(1)
    assert idle_expired(policy, served, clock.now())
    assert not idle_expired(SessionPolicy(), served, clock.now() + 1000 * H)
    assert idle_deadline(policy, None) is None


def test_warning_before_a_login_is_needed() -> None:
    clock = FakeClock()
    now = clock.now()
    policy = SessionPolicy(warn_before=10 * M, refresh_token_lifetime=90 * M)
    # The provider said when the refresh token expires: that wins over the profile's lifetime.
    at = login_needed_at(policy, logged_in_at=now, token_expiry=now + H, has_refresh_token=True,
                         refreshed_at=now, refresh_expires_at=now + 30 * M)
    assert at == now + 30 * M
    assert warn_at(policy, at) == now + 20 * M
    # It did not: the profile's refresh_token_lifetime from the last grant.
    at = login_needed_at(policy, logged_in_at=now, token_expiry=now + H, has_refresh_token=True,
                         refreshed_at=now, refresh_expires_at=None)
    assert at == now + 90 * M
    # No refresh token: the served token's expiry is when the next login comes.
    at = login_needed_at(policy, logged_in_at=now, token_expiry=now + H, has_refresh_token=False,
                         refreshed_at=now, refresh_expires_at=None)
    assert at == now + H
    # max_session_age comes first when it is earlier.
    aged = SessionPolicy(warn_before=10 * M, max_session_age=20 * M)
    assert login_needed_at(aged, logged_in_at=now, token_expiry=now + H, has_refresh_token=True,
                           refreshed_at=now, refresh_expires_at=None) == now + 20 * M
    # Nothing known, or no warning wanted.
    assert login_needed_at(SessionPolicy(), logged_in_at=now, token_expiry=now + H, has_refresh_token=True,
                           refreshed_at=now, refresh_expires_at=None) is None
    assert warn_at(SessionPolicy(), now + H) is None


def test_at_most_one_warning_per_warn_before() -> None:
    policy = SessionPolicy(warn_before=10 * M)
    now = FakeClock().now()
    # Warned at `now` for a login at now + 8 min; a refresh slid it to now + 9 min: no second warning for it.
    assert warn_at(policy, now + 9 * M, last_warned_at=now) is None
    # Slid well beyond: the next warning comes warn_before after the last one at the earliest.
    assert warn_at(policy, now + 15 * M, last_warned_at=now) == now + 10 * M
    assert warn_at(policy, now + 40 * M, last_warned_at=now) == now + 30 * M


def test_background_login_mode() -> None:
    assert background_mode(SessionPolicy(), notifications_answer=True) == "notify"
    assert background_mode(SessionPolicy(), notifications_answer=False) == "browser"  # today's behaviour
    assert background_mode(SessionPolicy(background_login="browser"), notifications_answer=True) == "browser"
    assert background_mode(SessionPolicy(background_login="refuse"), notifications_answer=True) == "refuse"
    # Set to notify where nothing can show one: no surprise tab instead.
    assert background_mode(SessionPolicy(background_login="notify"), notifications_answer=False) == "refuse"


def test_confirmations_per_executable_and_parent_expire() -> None:
    clock = FakeClock()
    policy = SessionPolicy(confirm=True, confirm_ttl=H)
    approvals = Approvals()
    kubectl_in_k9s = CallerIdentity("/usr/bin/kubectl", "/usr/bin/k9s")
    kubectl_in_bash = CallerIdentity("/usr/bin/kubectl", "/usr/bin/bash")
    assert approvals.needs_confirm(policy, kubectl_in_k9s, clock.now())
    approvals.allow(policy, kubectl_in_k9s, clock.now())
    assert not approvals.needs_confirm(policy, kubectl_in_k9s, clock.now())
    assert approvals.needs_confirm(policy, kubectl_in_bash, clock.now())  # another parent asks again
    clock.advance(H - 1)
    assert not approvals.needs_confirm(policy, kubectl_in_k9s, clock.now())
    clock.advance(1)
    assert approvals.needs_confirm(policy, kubectl_in_k9s, clock.now())
    # Without confirm nothing is asked; an unreadable executable is asked every time.
    assert not approvals.needs_confirm(SessionPolicy(), kubectl_in_bash, clock.now())
    unknown = CallerIdentity(None, "/usr/bin/bash")
    approvals.allow(policy, unknown, clock.now())
    assert approvals.needs_confirm(policy, unknown, clock.now())
    approvals.allow(policy, kubectl_in_bash, clock.now())
    approvals.forget()
    assert approvals.needs_confirm(policy, kubectl_in_bash, clock.now())


def test_approvals_are_bounded() -> None:
    clock = FakeClock()
    policy = SessionPolicy(confirm=True)
    approvals = Approvals(limit=3)
    callers = [CallerIdentity(f"/bin/tool{i}", "/bin/sh") for i in range(4)]
    for who in callers:
        approvals.allow(policy, who, clock.now())
    assert approvals.needs_confirm(policy, callers[0], clock.now())  # the oldest answer went first
    assert not any(approvals.needs_confirm(policy, who, clock.now()) for who in callers[1:])


def test_status_shows_the_policy_in_force() -> None:
    assert SessionPolicy().describe() == {}
    assert SessionPolicy(confirm=True, idle_logout=8 * H).describe() == {"confirm": True, "confirm_ttl": 3600.0,
                                                                        "idle_logout": 8 * H}


def test_a_recent_no_is_held_so_a_retrying_tool_is_not_asked_again_at_once() -> None:
    clock = FakeClock()
    policy = SessionPolicy(confirm=True, confirm_ttl=H)
    approvals = Approvals()
    tool = CallerIdentity("/usr/bin/kubectl", "/opt/ide/ide")
    approvals.allow(policy, tool, clock.now())
    approvals.deny(tool, clock.now(), hold=60)  # a later "no" replaces an earlier "yes"
    assert approvals.needs_confirm(policy, tool, clock.now())
    assert approvals.denied_until(tool, clock.now()) == clock.now() + 60
    clock.advance(60)
    assert approvals.denied_until(tool, clock.now()) is None
    approvals.deny(tool, clock.now(), hold=60)
    approvals.allow(policy, tool, clock.now())  # the person allowed it at a terminal meanwhile
    assert approvals.denied_until(tool, clock.now()) is None
    assert not approvals.needs_confirm(policy, tool, clock.now())


def test_confirm_ttl_zero_means_ask_every_time() -> None:
    clock = FakeClock()
    book = load_policy_book(tomllib.loads('[policy."https://a"]\nconfirm = true\nconfirm_ttl = 0'), "config.toml")
    policy = book.for_session("https://a")
    approvals = Approvals()
    who = CallerIdentity("/usr/bin/kubectl", "/usr/bin/bash")
    approvals.allow(policy, who, clock.now())
    assert approvals.needs_confirm(policy, who, clock.now())
