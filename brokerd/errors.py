"""One exception tree for brokerd.

Every error a person can see is a ``BrokerError``; its ``str()`` is the one line shown on the caller's stderr and
``exit_code`` is what the shim exits with.  Third-party errors are converted at the module that talks to the third
party (``raise ProviderError(...) from exc``); nothing above the adapters sees aiohttp or joserfc exceptions.

    BrokerError                      exit 1 unless stated
      UsageError                     exit 2: bad or contradictory flags, unknown subcommand
      ConfigError                    exit 2: broken config file or profile
      ProviderError                  the provider could not be reached or answered nonsense
        DiscoveryError               discovery document or JWKS missing/invalid
        TokenEndpointError           the token endpoint answered an error (``error``, ``description``, ``status``)
          InvalidGrant               invalid_grant: the refresh token or code is dead; never retried
      TokenValidationError           an ID token failed verification (signature, iss, aud, exp, nonce, ...)
      LoginError                     the interactive login did not complete
        LoginDenied                  the provider sent ``error=`` to the callback (e.g. access_denied)
        LoginTimeout                 nobody finished the login in time
        LoginPending                 a login is open in the browser and this caller cannot wait for it
        LoginInterrupted             the daemon shut down while the login was pending
        CallbackUnavailable          no loopback port could be bound for the redirect
      StoreError                     the encrypted session store could not be read or written
      ProtocolError                  a malformed request on the daemon socket
      PeerRejected                   a socket peer that is not the daemon's own user
      NotificationError              the caller's session bus or its notification server failed (notify.py)
      PolicyRefused                  a policy said no: a confirmation denied or unanswered, a login refused
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error brokerd reports to a person."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(BrokerError):
    exit_code = 2


class ConfigError(BrokerError):
    exit_code = 2


class ProviderError(BrokerError):
    """The provider is unreachable or answered something we cannot use.  Transient unless a subclass says not.

    ``maybe_delivered`` is False only when the request certainly never reached the provider (no connection could
    be made).  Anything else may have been processed, which decides whether a single-use grant such as a rotating
    refresh token may be sent again (see ``brokerd.refresh.refresh_token_lost``).
    """

    maybe_delivered: bool = True


class DiscoveryError(ProviderError):
    pass


class TokenEndpointError(ProviderError):
    def __init__(self, message: str, *, error: str | None = None, description: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.description = description
        self.status = status


class InvalidGrant(TokenEndpointError):
    """The grant (refresh token, code, device code) is dead.  Drop it; do not retry."""


class TokenValidationError(BrokerError):
    pass


class ClaimTimeError(TokenValidationError):
    """Only the ID token's time claims (exp, nbf, iat) failed against our clock, which may be the wrong one."""


class LoginError(BrokerError):
    pass


class LoginDenied(LoginError):
    pass


class LoginTimeout(LoginError):
    pass


class LoginPending(LoginError):
    pass


class LoginInterrupted(LoginError):
    pass


class CallbackUnavailable(LoginError):
    pass


class StoreError(BrokerError):
    # A failed save whose new content may still be what the disk holds (the rename happened, its fsync failed).
    maybe_written: bool = False


class StateDirBusy(BrokerError):
    """Another brokerd holds the state directory (brokerd/statelock.py)."""


class KeyringUnavailable(StoreError):
    """The store's key is in a keyring that is locked or not running: wait for it, never set the store aside."""


class ProtocolError(BrokerError):
    exit_code = 2


class PeerRejected(BrokerError):
    pass


class NotificationError(BrokerError):
    """The session bus or the notification server could not be used; callers fall back (browser, terminal)."""


class PolicyRefused(BrokerError):
    """A per-session policy refused this caller (policy.py); the message says what to do next."""
