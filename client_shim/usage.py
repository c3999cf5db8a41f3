"""Help and version for ``kubectl oidc-login`` / the shim, answered locally: no daemon is asked or started.

core.py imports this only when help or the version is asked, so kubectl's hot path never loads the text.  Stdlib
only, like the rest of client_shim.  FLAG_HELP must name every flag of brokerd/flags.py (FLAGS and SETUP_FLAGS);
tests/test_usage.py holds the two tables together.
"""

from __future__ import annotations

import sys

# (flag, value placeholder or "" for a boolean, text).  Order: as kubelogin's own --help groups them.
GET_TOKEN_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("oidc-issuer-url", "URL", "issuer URL of the OIDC provider (required)"),
    ("oidc-client-id", "ID", "client ID registered at the provider (required)"),
    ("oidc-client-secret", "SECRET", "client secret (better: a profile in brokerd's config.toml, --profile)"),
    ("oidc-extra-scope", "SCOPE", "scope to ask for besides openid (repeatable, or comma-separated)"),
    ("oidc-use-access-token", "", "give kubectl the access token instead of the ID token"),
    ("oidc-redirect-url", "URL", "redirect URL sent to the provider (default http://localhost:PORT of the listener)"),
    ("oidc-auth-request-extra-params", "KEY=VALUE", "extra parameter of the authorization request (repeatable)"),
    ("oidc-pkce-method", "METHOD", "PKCE: auto (S256), S256, or no"),
    ("oidc-request-header", "KEY=VALUE", "extra HTTP header on requests to the provider (repeatable)"),
    ("grant-type", "TYPE",
     "auto, authcode, authcode-keyboard, password, device-code or client-credentials (default auto)"),
    ("username", "NAME", "user for the password grant (implies --grant-type=password with auto)"),
    ("password", "PASSWORD", "password for the password grant (asked on the terminal when left out)"),
    ("session-name", "NAME", "keep a separate session under this name (two accounts at one provider)"),
    ("profile", "NAME", "take the provider settings from this profile of brokerd's config.toml"),
    ("listen-address", "HOST:PORT",
     "address of the loopback listener for the redirect (repeatable; default 127.0.0.1:8000,127.0.0.1:18000)"),
    ("listen-port", "PORT", "deprecated kubelogin form of --listen-address=127.0.0.1:PORT"),
    ("skip-open-browser", "", "do not open a browser; print the URL only"),
    ("browser-command", "COMMAND", "command that opens the login URL (default: $BROWSER, then the desktop's)"),
    ("authentication-timeout-sec", "SECONDS", "how long a browser login may take (default 180)"),
    ("open-url-after-authentication", "URL", "page the browser shows after the login"),
    ("local-server-cert", "FILE", "certificate of the loopback listener, for an https redirect URL (absolute path)"),
    ("local-server-key", "FILE", "key of that certificate (absolute path)"),
    ("token-cache-dir", "DIR", "accepted for kubelogin compatibility; ignored (sessions live in the daemon's store)"),
    ("token-cache-storage", "KIND",
     "disk (default), keyring (the store's key must be in the keyring) or none (this session is never written)"),
    ("force-refresh", "", "refresh (or log in again) even when the cached token is still valid"),
    ("certificate-authority", "FILE", "CA certificate of the provider, PEM (repeatable; absolute path)"),
    ("certificate-authority-data", "BASE64", "CA certificate of the provider, base64 of PEM (repeatable)"),
    ("insecure-skip-tls-verify", "", "do not verify the provider's certificate (testing only)"),
    ("v", "LEVEL", "log verbosity, also -v (the daemon logs; -v N asks for detail on this request)"),
    ("oidc-client-auth-method", "METHOD", "client_secret_basic, client_secret_post, client_secret_jwt, "
     "private_key_jwt or none (default: from discovery)"),
    ("oidc-client-assertion-key", "FILE", "private key for private_key_jwt: PEM or JWK/JWKS (absolute path, 0600)"),
    ("oidc-client-assertion-alg", "ALG", "signing algorithm of the client assertion (default: from the key)"),
    ("oidc-client-assertion-kid", "KID", "key id put in the client assertion's header (default: the JWK's kid)"),
    ("oidc-par", "MODE", "pushed authorization requests: auto (when the provider offers them), always or never"),
    ("oidc-response-mode", "MODE", "query (default), form_post, jwt, query.jwt or form_post.jwt (JARM)"),
    ("oidc-id-token-decryption-key", "FILE", "private key that decrypts an encrypted ID token (absolute path)"),
)
SETUP_ONLY_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("oidc-username-claim", "CLAIM", "the API server's --oidc-username-claim, to show the username it will see"),
    ("oidc-username-prefix", "PREFIX", "the API server's --oidc-username-prefix"),
    ("oidc-groups-claim", "CLAIM", "the API server's --oidc-groups-claim, to show the groups it will see"),
    ("oidc-groups-prefix", "PREFIX", "the API server's --oidc-groups-prefix"),
)
HELP = ("-h", "--help")


def _table(flags: tuple[tuple[str, str, str], ...]) -> str:
    rows = [(f"--{name}" + (f"={value}" if value else ""), text) for name, value, text in flags]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left.ljust(width)}  {text}" for left, text in rows)


def root_usage(program: str) -> str:
    return f"""Usage: {program} COMMAND [flags]

A drop-in for kubelogin backed by the brokerd daemon: one login shared by every terminal and tool.

Commands:
  get-token   print an ExecCredential for kubectl (logs in or refreshes through the daemon when needed)
  setup       log in once and print the kubeconfig, API server flags and RBAC to use
  clean       forget every session (works without the daemon)
  version     print the version

Run `{program} COMMAND --help` for a command's flags.  The daemon itself: `brokerd --help`.
"""


def get_token_usage(program: str) -> str:
    return f"""Usage: {program} get-token --oidc-issuer-url=URL --oidc-client-id=ID [flags]

Print an ExecCredential with a valid token: from the daemon's cache, else by a refresh, else by a login in the
browser.  kubectl runs this from a kubeconfig's exec section; stdout carries only the ExecCredential.

Flags:
{_table((*GET_TOKEN_FLAGS, ("help", "", "show this help (also -h)")))}
"""


def setup_usage(program: str) -> str:
    return f"""Usage: {program} setup --oidc-issuer-url=URL --oidc-client-id=ID [flags]

Log in once, show the claims and what the API server will see, and print the kubeconfig (drop-in and direct
forms), the API server flags and an RBAC binding.  Takes every get-token flag, and:

{_table(SETUP_ONLY_FLAGS)}

get-token flags:
{_table(GET_TOKEN_FLAGS)}
"""


def version() -> str:
    """The installed distribution's version; in a source tree (the direct form of an editable install, where no
    dist-info is on the isolated path), the one brokerd/__init__.py declares."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("brokerd")
    except PackageNotFoundError:
        pass
    here = __file__.rpartition("/")[0].rpartition("/")[0]
    try:
        with open(f"{here}/brokerd/__init__.py", encoding="utf-8") as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.partition("=")[2].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"


def main(args: list[str], program: str) -> int:
    """Answer help or version; exit status 0, or 2 for an unknown command (with the usage on stderr)."""
    name = program if program != "kubectl-oidc_login" else "kubectl oidc-login"
    words = [a for a in args if a not in HELP]
    command = words[0] if words else ""
    if command == "help":  # cobra's `help COMMAND`
        command = words[1] if len(words) > 1 else ""
    if command in ("version", "--version") and not any(a in HELP for a in args):
        return _out(f"brokerd {version()}\n")
    if command == "get-token":
        text = get_token_usage(name)
    elif command == "setup":
        text = setup_usage(name)
    elif command == "clean":
        text = f"Usage: {name} clean\n\nForget every session: through the daemon when it runs (it also revokes " \
               "refresh tokens), else straight in the store.\n"
    elif command == "version":
        text = f"Usage: {name} version\n\nPrint the version.\n"
    elif command == "":
        text = root_usage(name)
    else:
        sys.stderr.write(f"unknown command {command!r}\n\n{root_usage(name)}")
        return 2
    return _out(text)


def _out(text: str) -> int:
    """``text`` on stdout, flushed here so that a failure is this one line on stderr (and 1), not run()'s."""
    try:
        if sys.stdout is None:
            raise OSError("stdout is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        if sys.stderr is not None:
            sys.stderr.write(f"brokerd: cannot write to stdout: {getattr(exc, 'strerror', None) or exc}\n")
        return 1
    return 0
