"""brokerd: a local OIDC token broker for kubectl."""

__version__ = "0.1.0"
