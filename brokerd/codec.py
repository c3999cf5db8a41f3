"""Sessions as JSON documents for the store, and back.  Pure: no I/O, no crypto.

Unknown fields are ignored (an older brokerd reads a newer layout); a wrong type or a key that does not match its
settings makes that one entry unusable (``BadEntry``), never the whole store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from brokerd.models import ProviderSettings, Session, TLSOptions, TokenSet
from brokerd.registration import ClientRegistration


class BadEntry(ValueError):
    pass


def session_to_dict(session: Session) -> dict[str, Any]:
    s, t = session.settings, session.tokens
    return {
        "key": session.key.value,
        "settings": {
            "issuer": s.issuer,
            "client_id": s.client_id,
            "client_secret": s.client_secret,  # kept: the refresh grant needs it after a restart
            "scopes": list(s.scopes),
            "extra_params": [list(p) for p in s.extra_params],
            "use_access_token": s.use_access_token,
            "redirect_url": s.redirect_url,
            "username": s.username,
            **({"registration": reg} if (reg := s.registration.non_defaults()) else {}),
        },
        "tokens": {
            "id_token": t.id_token,
            "expires_at": t.expires_at,
            "issued_at": t.issued_at,
            "refresh_token": t.refresh_token,
            "access_token": t.access_token,
            "access_expires_at": t.access_expires_at,
            "refresh_expires_at": t.refresh_expires_at,
            "claims": dict(t.claims),
        },
        "agent": {"logged_in_at": session.logged_in_at, "last_served_at": session.last_served_at},
        # How to reach the provider: part of the settings (and of the key when not the defaults); kept under
        # "options", where brokerd wrote it before it was part of the settings.
        "options": {
            "ca_files": list(s.tls.ca_files),
            "ca_data": list(s.tls.ca_data),
            "insecure_skip_verify": s.tls.insecure_skip_verify,
            "request_headers": [list(h) for h in s.request_headers],
        },
    }


def _get(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = doc.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        raise BadEntry(f"field {name!r} missing or of the wrong type")
    return value


def _number(doc: Mapping[str, Any], name: str, optional: bool = False) -> Any:
    value = _get(doc, name, (int, float), optional)
    if value is None:
        return None
    # bool is an int to isinstance; True as a timestamp is format drift, not a time.
    if isinstance(value, bool) or not math.isfinite(value):
        raise BadEntry(f"field {name!r} is not a finite number")
    return float(value)


def session_from_dict(doc: Mapping[str, Any]) -> Session:
    """Rebuild a session; the key is recomputed from the settings and must equal the stored one."""
    if not isinstance(doc, Mapping):
        raise BadEntry("entry is not an object")
    sd = _get(doc, "settings", dict)
    td = _get(doc, "tokens", dict)
    scopes, pairs = _get(sd, "scopes", list), _get(sd, "extra_params", list)
    if not all(isinstance(v, str) for v in scopes):
        raise BadEntry("field 'scopes' must be a list of strings")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise BadEntry("field 'extra_params' must be a list of [name, value] string pairs")
    tls, headers = _options(doc.get("options"))
    settings = ProviderSettings(
        issuer=_get(sd, "issuer", str),
        client_id=_get(sd, "client_id", str),
        client_secret=_get(sd, "client_secret", str, optional=True),
        scopes=tuple(scopes),
        extra_params=tuple((p[0], p[1]) for p in pairs),
        use_access_token=_get(sd, "use_access_token", bool),
        redirect_url=_get(sd, "redirect_url", str, optional=True),
        username=_get(sd, "username", str, optional=True),
        tls=tls,
        request_headers=headers,
        registration=_registration(sd.get("registration")),
    )
    tokens = TokenSet(
        id_token=_get(td, "id_token", str),
        expires_at=_number(td, "expires_at"),
        issued_at=_number(td, "issued_at"),
        refresh_token=_get(td, "refresh_token", str, optional=True),
        access_token=_get(td, "access_token", str, optional=True),
        access_expires_at=_number(td, "access_expires_at", optional=True),
        refresh_expires_at=_number(td, "refresh_expires_at", optional=True),  # absent in stores before it was kept
        claims=dict(_get(td, "claims", dict, optional=True) or {}),
    )
    stored_key = _get(doc, "key", str)
    if settings.key.value != stored_key:
        # Written before the TLS options and request headers were part of the key: the same settings without
        # them give the stored key; the session is filed under its key of today.
        legacy = replace(settings, tls=TLSOptions(), request_headers=())
        if legacy.key.value != stored_key:
            raise BadEntry(f"stored key {stored_key[:12]} does not match its settings (now {settings.key.short()})")
    agent = doc.get("agent")
    agent = agent if isinstance(agent, dict) else {}  # written before the agent's clocks were kept: none
    return Session(key=settings.key, settings=settings, tokens=tokens,
                   logged_in_at=_number(agent, "logged_in_at", optional=True),
                   last_served_at=_number(agent, "last_served_at", optional=True))


def _registration(doc: Any) -> ClientRegistration:
    try:
        return ClientRegistration.from_doc(doc)
    except ValueError as exc:
        raise BadEntry(str(exc)) from None


def _strings(doc: Mapping[str, Any], name: str) -> tuple[str, ...]:
    values = _get(doc, name, list, optional=True) or []
    if not all(isinstance(v, str) for v in values):
        raise BadEntry(f"field {name!r} must be a list of strings")
    return tuple(values)


def _options(doc: Any) -> tuple[TLSOptions, tuple[tuple[str, str], ...]]:
    """How to reach the provider; absent in stores written before it was kept (then: the defaults)."""
    if doc is None:
        return TLSOptions(), ()
    if not isinstance(doc, Mapping):
        raise BadEntry("field 'options' is not an object")
    headers = _get(doc, "request_headers", list, optional=True) or []
    if not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers):
        raise BadEntry("field 'request_headers' must be a list of [name, value] string pairs")
    tls = TLSOptions(ca_files=_strings(doc, "ca_files"), ca_data=_strings(doc, "ca_data"),
                     insecure_skip_verify=bool(_get(doc, "insecure_skip_verify", bool, optional=True)))
    return tls, tuple((h[0], h[1]) for h in headers)
