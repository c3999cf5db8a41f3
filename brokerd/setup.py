"""``setup``: log in once, show what the API server will see, and diagnose the provider mistakes users hit.

Runs in the daemon (``run_setup``, reached through server.py's ``setup`` handler); the answer is a JSON report that
``brokerd setup`` renders (``render_report``), because only the CLI knows its own interpreter and shim paths.
Checks before the login (each would otherwise end in a browser error page and a timeout):
issuer mismatch between the URL and discovery, and a redirect URI the provider does not accept (then the variants
people confuse, localhost/127.0.0.1, trailing slash, port, are tried to name the one that works).
Then the client's registration (setup_registration.py): authentication method, JWT assertion, PAR, response mode.
Checks after it: groups claim missing from the ID token (and whether userinfo has it), no refresh token, username
claim missing or unusable.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from brokerd.errors import BrokerError, DiscoveryError, TokenEndpointError
from brokerd.flags import FLAGS, SETUP_FLAGS, ParsedFlags, login_options, provider_settings
from brokerd.models import Caller, LoginOptions, ProviderSettings, TokenSet
from brokerd.oidc import GROUPS_CLAIMS_REQUEST, ClientFactory, OIDCClient
from brokerd.oidc_wire import safe_text
from brokerd.provider_http import proxy_options
from brokerd.setup_registration import registration_diagnosis

SECRET_PLACEHOLDER = "YOUR_CLIENT_SECRET"
NOT_REPEATED = frozenset({"password", "force-refresh", "v", *SETUP_FLAGS})  # never in the printed kubeconfig
PROBE_TIMEOUT = 10.0

GROUPS_SOURCE = {"id_token": " (from the ID token)",
                 "userinfo": " (the provider has groups, but only in userinfo: the API server reads the ID token)"}

GetToken = Callable[[ProviderSettings, LoginOptions, Caller], Awaitable[TokenSet]]


@dataclass(frozen=True)
class Finding:
    code: str  # stable name, for tests and scripts
    problem: str
    fix: str
    fatal: bool = False


@dataclass(frozen=True)
class ApiServerView:
    """The API server's --oidc-* flags that decide the username and groups (defaults as kube-apiserver's)."""

    username_claim: str = "sub"
    username_prefix: str | None = None  # None: "<issuer>#" unless the claim is email; "-": none
    groups_claim: str = "groups"
    groups_prefix: str = ""

    @classmethod
    def from_flags(cls, flags: ParsedFlags) -> ApiServerView:
        return cls(flags.str_("oidc-username-claim") or "sub", flags.str_("oidc-username-prefix"),
                   flags.str_("oidc-groups-claim") or "groups", flags.str_("oidc-groups-prefix") or "")


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT that was verified already (or is only shown): no signature check here."""
    try:
        payload = token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def api_username(claims: Mapping[str, Any], issuer: str, view: ApiServerView) -> str | None:
    value = claims.get(view.username_claim)
    if not isinstance(value, str) or not value:
        return None
    prefix = view.username_prefix
    if prefix is None:
        prefix = "" if view.username_claim == "email" else f"{issuer}#"
    elif prefix == "-":
        prefix = ""
    return prefix + value


def api_groups(claims: Mapping[str, Any], view: ApiServerView) -> list[str]:
    value = claims.get(view.groups_claim)
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [view.groups_prefix + g for g in names if isinstance(g, str)]


def kubeconfig_args(flags: ParsedFlags) -> list[str]:
    """The get-token flags to put in the kubeconfig: as given, minus one-off and setup-only flags, with the client
    secret replaced by a placeholder (setup never echoes a secret back)."""
    out = ["get-token"]
    for name, value in flags.values.items():
        if name in NOT_REPEATED:
            continue
        items: Sequence[object] = value if isinstance(value, list) else [value]
        for item in items:
            if name == "oidc-client-secret":
                out.append(f"--{name}={SECRET_PLACEHOLDER}")
            elif isinstance(item, bool):
                out.append(f"--{name}" if item else f"--{name}=false")
            elif isinstance(item, tuple):
                out.append(f"--{name}={item[0]}={item[1]}")
            else:
                out.append(f"--{name}={item}")
    return out


# ---- checks against the provider -----------------------------------------------------------------------------


async def _get(http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None,
               ) -> tuple[int, str | None, str]:
    async with http.get(url, allow_redirects=False, headers=headers, **proxy_options(url),
                        timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as resp:
        body = await resp.content.read(256 * 1024)
        return resp.status, resp.headers.get("Location"), body.decode("utf-8", "replace")


async def check_issuer(oidc: OIDCClient, issuer: str) -> Finding | None:
    try:
        await oidc.metadata(issuer)
        return None
    except DiscoveryError as exc:
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            status, _, body = await _get(oidc.http, url)
            found = json.loads(body).get("issuer") if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, str) and found != issuer:
            return Finding("issuer-mismatch",
                           f"the provider calls itself {safe_text(found)!r}, not {issuer!r}; brokerd and the API "
                           "server compare the issuer exactly (scheme, host, port, trailing slash)",
                           f"use --oidc-issuer-url={safe_text(found)} here and the same value in the API server's "
                           "--oidc-issuer-url (or fix the provider's public URL setting)", fatal=True)
        return Finding("discovery", str(exc), "check the issuer URL and that the provider is reachable", fatal=True)
    except BrokerError as exc:
        return Finding("discovery", str(exc), "check the issuer URL, the network, proxies and the CA flags",
                       fatal=True)


def redirect_uris(settings: ProviderSettings, options: LoginOptions) -> list[str]:
    if settings.redirect_url:
        return [settings.redirect_url]
    scheme = "https" if options.local_server_cert else "http"
    return [f"{scheme}://localhost:{address.rpartition(':')[2]}" for address in options.listen_addresses]


async def probe_redirect(oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions,
                         uri: str) -> str | None:
    """None when the provider accepts an authorization request with this redirect URI, else what it said."""
    auth = await oidc.authorization_request(settings, uri, pkce_method=options.pkce_method)
    try:
        status, location, body = await _get(oidc.http, auth.url)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"the authorization endpoint did not answer ({type(exc).__name__})"
    if 300 <= status < 400 and location:
        params = dict(parse_qsl(urlsplit(location).query))
        if "error" not in params:
            return None  # on to the login page
        if location.startswith(uri) and "redirect" not in params.get("error_description", "").lower():
            # The provider trusts the redirect URI (it sent the error there) but refuses something else.
            return None
        return safe_text(f"{params['error']}: {params.get('error_description', '')}")
    if status < 400:
        return None  # a login page served directly (Keycloak)
    text = " ".join(body.replace("<", " <").split())
    return safe_text(_strip_tags(text) or f"HTTP {status}", 300)


def _strip_tags(html: str) -> str:
    out, depth = [], 0
    for ch in html:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return " ".join("".join(out).split())


def redirect_variants(uri: str, options: LoginOptions) -> list[str]:
    """The redirect URIs people confuse with ``uri``, most likely first."""
    parts = urlsplit(uri)
    ports = [parts.port or 80, *(int(a.rpartition(":")[2]) for a in options.listen_addresses)]
    hosts = ["localhost", "127.0.0.1"]
    paths = [parts.path, parts.path + "/" if not parts.path.endswith("/") else parts.path.rstrip("/")]
    seen, out = {uri}, []
    for port in dict.fromkeys(ports):
        for host in hosts:
            for path in paths:
                candidate = f"{parts.scheme}://{host}:{port}{path}"
                if candidate not in seen:
                    seen.add(candidate)
                    out.append(candidate)
    return out[:8]


async def check_redirect(oidc: OIDCClient, settings: ProviderSettings, options: LoginOptions) -> Finding | None:
    refusals = []
    for uri in redirect_uris(settings, options):
        refusal = await probe_redirect(oidc, settings, options, uri)
        if refusal is None:
            return None
        refusals.append((uri, refusal))
    uri, refusal = refusals[0]
    if "redirect" not in refusal.lower():
        return Finding("authorization-refused", f"the provider refuses the authorization request: {refusal}",
                       "check the client id, scopes and extra parameters against the client's registration",
                       fatal=True)
    for candidate in redirect_variants(uri, options):
        if await probe_redirect(oidc, settings, options, candidate) is None:
            port = urlsplit(candidate).port
            listen = "" if any(a.endswith(f":{port}") for a in options.listen_addresses) else (
                f" --listen-address=127.0.0.1:{port}")
            return Finding("redirect-mismatch",
                           f"the provider does not accept the redirect URI {uri} ({refusal}), but it accepts "
                           f"{candidate}; redirect URIs must match exactly",
                           f"add --oidc-redirect-url={candidate}{listen}, or register {uri} for client "
                           f"{settings.client_id} at the provider", fatal=True)
    return Finding("redirect-mismatch",
                   f"the provider does not accept the redirect URI {uri} ({refusal})",
                   f"register exactly {uri} (no trailing slash; localhost and 127.0.0.1 differ) as a redirect URI "
                   f"of client {settings.client_id}, or pass the one registered with --oidc-redirect-url", fatal=True)


async def _userinfo_groups(oidc: OIDCClient, issuer: str, tokens: TokenSet, claim: str) -> bool:
    meta = await oidc.metadata(issuer)
    if not meta.userinfo_endpoint or not tokens.access_token:
        return False
    try:
        status, _, body = await _get(oidc.http, meta.userinfo_endpoint,
                                     {"Authorization": f"Bearer {tokens.access_token}", "Accept": "application/json"})
        return status == 200 and claim in json.loads(body)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, TypeError):
        return False


async def check_tokens(oidc: OIDCClient, settings: ProviderSettings, tokens: TokenSet, claims: Mapping[str, Any],
                       view: ApiServerView) -> list[Finding]:
    findings = []
    if api_username(claims, settings.issuer, view) is None:
        findings.append(Finding(
            "no-username-claim", f"the ID token has no {view.username_claim!r} claim, so the API server rejects it",
            "ask for the scope that carries it (email: --oidc-extra-scope=email) or use another "
            "--oidc-username-claim on the API server"))
    if view.username_claim == "email" and claims.get("email_verified") is False:
        findings.append(Finding("email-not-verified", "email_verified is false: the API server refuses email "
                                "usernames that are not verified", "verify the address at the provider, or use "
                                "--oidc-username-claim=sub"))
    if view.groups_claim not in claims:
        in_userinfo = await _userinfo_groups(oidc, settings.issuer, tokens, view.groups_claim)
        where = ("the provider knows them (its userinfo endpoint has the claim) but does not put them in the "
                 "ID token, which is all the API server reads") if in_userinfo else "so RBAC by group cannot work"
        scope_hint = "" if "groups" in settings.scopes else "--oidc-extra-scope=groups (brokerd then also sends " \
            "the claims parameter when the provider supports it), or "
        findings.append(Finding(
            "no-groups", f"the ID token has no {view.groups_claim!r} claim: {where}",
            f"{scope_hint}--oidc-auth-request-extra-params='claims={GROUPS_CLAIMS_REQUEST}', or a claims policy "
            "on the provider (Authelia 4.39: claims_policy with id_token: [groups])"))
    if not tokens.refresh_token:
        if "offline_access" not in settings.scopes:
            fix = "add --oidc-extra-scope=offline_access (Authelia also needs consent once per login)"
        else:
            fix = ("offline_access was asked for, so the client is likely missing the refresh_token grant type "
                   "(Authelia: grant_types: [authorization_code, refresh_token]) or the provider does not allow it")
        findings.append(Finding("no-refresh-token", "the provider issued no refresh token: you will log in again "
                                "every time the ID token expires", fix))
    if settings.use_access_token and tokens.access_token and not jwt_claims(tokens.access_token):
        findings.append(Finding("opaque-access-token", "--oidc-use-access-token is set but the access token is not "
                                "a JWT, so the API server cannot verify it", "drop --oidc-use-access-token"))
    return findings


async def run_setup(flags: ParsedFlags, client_for: ClientFactory, get_token: GetToken,
                    caller: Caller) -> dict[str, Any]:
    """The report (JSON-able).  ``flags`` hold get-token and setup flags, the profile already merged in."""
    view = ApiServerView.from_flags(flags)
    token_flags = ParsedFlags({k: v for k, v in flags.values.items() if k in FLAGS})
    settings, options = provider_settings(token_flags), login_options(token_flags)
    oidc = await client_for(settings)
    report: dict[str, Any] = {"issuer": settings.issuer, "client_id": settings.client_id, "logged_in": False,
                              "view": asdict(view), "scopes": list(settings.scopes)}
    finding = await check_issuer(oidc, settings.issuer)
    authcode = options.grant_type in ("auto", "authcode") and options.password is None
    if finding is None and authcode:
        caller.tell("setup: checking the redirect URI with the provider")
        with contextlib.suppress(TokenEndpointError):  # a refused pushed request: diagnosed just below
            finding = await check_redirect(oidc, settings, options)
    if finding is None and (diagnosis := await registration_diagnosis(
            oidc, settings, options, redirect_uris(settings, options)[0] if authcode else None)):
        finding = Finding(diagnosis.code, diagnosis.problem, diagnosis.fix, fatal=True)
    if finding is not None:
        report["findings"] = [asdict(finding)]
        return report
    tokens = await get_token(settings, options, caller)
    claims = jwt_claims(tokens.id_token) or dict(tokens.claims)
    in_id_token = view.groups_claim in claims
    report["groups_source"] = "id_token" if in_id_token else (
        "userinfo" if await _userinfo_groups(oidc, settings.issuer, tokens, view.groups_claim) else "none")
    report.update(logged_in=True, claims=claims, refresh_token=bool(tokens.refresh_token),
                  username=api_username(claims, settings.issuer, view), groups=api_groups(claims, view),
                  id_token_lifetime=round(tokens.expires_at - tokens.issued_at),
                  findings=[asdict(f) for f in await check_tokens(oidc, settings, tokens, claims, view)])
    return report


# ---- rendering (in the CLI) ------------------------------------------------------------------------------------


def set_credentials_commands(args: Sequence[str], interpreter: str, shim: str, user: str = "oidc") -> list[str]:
    """``kubectl config set-credentials``: the drop-in form (kubectl's plugin dispatch) and the direct form."""
    head = ["kubectl", "config", "set-credentials", user, "--exec-api-version=client.authentication.k8s.io/v1",
            "--exec-interactive-mode=IfAvailable"]
    drop_in = [*head, "--exec-command=kubectl", "--exec-arg=oidc-login", *(f"--exec-arg={a}" for a in args)]
    direct = [*head, f"--exec-command={interpreter}", "--exec-arg=-I", "--exec-arg=-S", f"--exec-arg={shim}",
              *(f"--exec-arg={a}" for a in args)]
    return [" \\\n    ".join([" ".join(cmd[:4]), *(shlex.quote(a) for a in cmd[4:])]) for cmd in (drop_in, direct)]


def cluster_role_binding(username: str | None, groups: Sequence[str]) -> str:
    kind, name = ("Group", groups[0]) if groups else ("User", username or "")
    slug = "".join(c if c.isalnum() else "-" for c in (groups[0] if groups else "user").lower()).strip("-")
    return "\n".join([
        "apiVersion: rbac.authorization.k8s.io/v1", "kind: ClusterRoleBinding", "metadata:",
        f"  name: oidc-{slug or 'user'}-cluster-admin", "roleRef:", "  apiGroup: rbac.authorization.k8s.io",
        "  kind: ClusterRole", "  name: cluster-admin", "subjects:", "- apiGroup: rbac.authorization.k8s.io",
        f"  kind: {kind}", f"  name: {json.dumps(name)}"])


def render_report(doc: Mapping[str, Any], kube_args: Sequence[str], interpreter: str, shim: str) -> str:
    lines: list[str] = []
    findings = doc.get("findings") or []
    if doc.get("logged_in"):
        lines += ["## Login succeeded", "", "ID token claims:"]
        lines += ["  " + line for line in json.dumps(doc.get("claims", {}), indent=2, sort_keys=True).splitlines()]
        view = doc.get("view", {})
        groups = doc.get("groups") or []
        lines += ["", f"The API server (--oidc-username-claim={view.get('username_claim')}, "
                      f"--oidc-groups-claim={view.get('groups_claim')}) will see:",
                  f"  username: {doc.get('username') or '(none: the token would be rejected)'}",
                  f"  groups:   {', '.join(groups) if groups else '(none)'}"
                  f"{GROUPS_SOURCE.get(str(doc.get('groups_source')), '')}",
                  f"  refresh token: {'yes' if doc.get('refresh_token') else 'no'}; "
                  f"ID token lifetime {doc.get('id_token_lifetime')} s"]
    else:
        lines += ["## The login was not attempted: the provider setup has a problem"]
    for f in findings:
        lines += ["", f"problem ({f['code']}): {f['problem']}", f"  fix: {f['fix']}"]
    if not doc.get("logged_in"):
        return "\n".join(lines)
    drop_in, direct = set_credentials_commands(kube_args, interpreter, shim)
    lines += ["", "## Kubeconfig", "", "Drop-in form (as kubelogin; kubectl's plugin dispatch adds ~50 ms per call):",
              "", drop_in, "", "Direct form (fastest: absolute interpreter, -I -S, the shim itself):", "", direct,
              "", "A kubeconfig that already runs kubelogin converts to the direct form in place (with a backup; "
                  "`brokerd kubeconfig revert` undoes it):", "", "  brokerd kubeconfig convert --dry-run"]
    if any(a.startswith("--oidc-client-secret=") for a in kube_args):
        lines += ["", f"Replace {SECRET_PLACEHOLDER} with the client secret, or better keep it out of the "
                      "kubeconfig in a profile of brokerd's config.toml and use --profile=NAME instead."]
    lines += ["", "## API server flags", "",
              f"  --oidc-issuer-url={doc['issuer']}", f"  --oidc-client-id={doc['client_id']}",
              f"  --oidc-username-claim={doc.get('view', {}).get('username_claim')}",
              f"  --oidc-groups-claim={doc.get('view', {}).get('groups_claim')}",
              "", "## RBAC (kubectl apply -f -)", "",
              cluster_role_binding(doc.get("username"), doc.get("groups") or [])]
    return "\n".join(lines)
