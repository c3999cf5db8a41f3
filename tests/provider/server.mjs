// Test-only OIDC provider for brokerd's integration tests, built on panva's oidc-provider.
// Defaults mimic Authelia 4.39 for the `kube_login` client (exact redirect URIs, PKCE S256, refresh tokens only
// with offline_access + consent, rotation with reuse detection, `groups` in the ID token only when asked for).
// Usage: node server.mjs [--port N] [--config FILE]   (or JSON in env BROKERD_TEST_PROVIDER_CONFIG)
// Prints exactly one line on stdout once listening: the issuer URL. Everything else goes to stderr.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider, { errors } from 'oidc-provider';

const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const KIND_BY_PATH = {
  '/token': 'token', '/.well-known/openid-configuration': 'discovery', '/jwks': 'jwks',
  '/token/revocation': 'revocation', '/me': 'userinfo', '/device/auth': 'device_authorization', '/auth': 'auth',
  '/token/introspection': 'introspection', '/request': 'pushed_authorization',
};
const CLIENT_AUTH_KINDS = new Set(['token', 'revocation', 'device_authorization', 'introspection',
  'pushed_authorization']);
const DEFAULTS = {
  otp: '123456', two_factor: true, id_token_ttl: 3600, access_token_ttl: 3600, refresh_token_ttl: 5400,
  auth_code_ttl: 60, device_code_ttl: 600, refresh_tokens: 'offline_access', rotate_refresh_tokens: true,
  groups_in_id_token: false, id_token_claims: ['email', 'email_verified', 'name', 'preferred_username'],
  pkce_required: true, min_state_length: 8, consent: 'offline_access', default_client: {}, clients: [],
  // Discovery fields to replace, e.g. { jwks_uri: 'http://127.0.0.1:N/jwks' }: endpoints on another host (a relay
  // the test can stop, so that host refuses connections).
  discovery_overrides: {},
  // Off by default so the plain code flow stays what older tests expect; a test that wants PAR turns it on (and a
  // client's require_pushed_authorization_requests makes it the only way in, like Authelia's setting).
  par: false,
  // Keycloak says how long a refresh token lives: 'refresh_expires_in' (Keycloak's name) or
  // 'refresh_token_expires_in' (others') adds that field, set to refresh_token_ttl, to every token response that
  // carries a refresh token.  null: not said (Authelia, oidc-provider).
  refresh_expires_field: null,
  encryption: false, // clients opt in with id_token_encrypted_response_alg and an enc key in their jwks
  jarm: false, // jwtResponseModes (clients opt in with authorization_signed_response_alg and response_modes)
  client_auth_signing_algs: ['HS256', 'HS384', 'HS512', 'RS256', 'RS384', 'RS512', 'PS256', 'ES256', 'ES384',
    'ES512', 'Ed25519', 'EdDSA'],
  users: {
    alice: { password: 'alice-password', email: 'alice@example.com', name: 'Alice Admin', groups: ['admins', 'dev'] },
    bob: { password: 'bob-password', email: 'bob@example.com', name: 'Bob Builder', groups: ['dev'] },
  },
};
const KUBE_LOGIN = {
  client_id: 'kube_login', client_secret: 'insecure_secret', client_name: 'kube_login',
  token_endpoint_auth_method: 'client_secret_basic',
  redirect_uris: ['http://localhost:8000', 'http://localhost:18000'],
  grant_types: ['authorization_code', 'refresh_token', DEVICE_GRANT, 'password', 'client_credentials'],
  response_types: ['code'], scope: 'openid groups email profile offline_access',
};

function parseArgs(argv) {
  const out = { port: 0, configFile: undefined };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--port') out.port = Number(argv[(i += 1)]);
    else if (argv[i] === '--config') out.configFile = argv[(i += 1)];
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  return out;
}

// Authelia hands out opaque UUID subjects; derive a stable one per user so tests can predict it.
const subFor = (name) => {
  const h = createHash('sha256').update(`brokerd-test:${name}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
};

// Signing keys come only from the test harness (tests/support/provider.py makes them with Python's cryptography):
// node 20's generateKeyPairSync can deadlock when a garbage collection runs the key job's destructor while the job
// still holds its lock (seen as a provider that hangs at start, every thread waiting on a futex). So there is no
// key generation here to fall back on: a missing key is the caller's error.
function newSigningKey(jwk) {
  if (jwk?.kty !== 'RSA' || !jwk.d) throw new Error('a private RSA JWK is required (signing_key, rotate_keys key)');
  return { ...jwk, kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

// A tiny Map-backed adapter: oidc-provider's bundled one is an LRU that may evict under long tests, and
// revoke_all needs to scan by account.
function makeAdapterClass(store) {
  const live = (e) => e && (e.exp === undefined || e.exp > Date.now());
  return class MapAdapter {
    constructor(name) { this.name = name; }
    k(id) { return `${this.name}:${id}`; }
    async upsert(id, payload, expiresIn) {
      store.set(this.k(id), { name: this.name, payload, exp: expiresIn ? Date.now() + expiresIn * 1000 : undefined });
    }
    async find(id) { const e = store.get(this.k(id)); return live(e) ? e.payload : undefined; }
    scan(pred) {
      for (const e of store.values()) if (e.name === this.name && live(e) && pred(e.payload)) return e.payload;
      return undefined;
    }
    async findByUserCode(code) { return this.scan((p) => p.userCode === code); }
    async findByUid(uid) { return this.scan((p) => p.uid === uid); }
    async consume(id) { const e = store.get(this.k(id)); if (e) e.payload.consumed = Math.floor(Date.now() / 1000); }
    async destroy(id) { store.delete(this.k(id)); }
    async revokeByGrantId(grantId) {
      for (const [key, e] of store) if (e.name === this.name && e.payload.grantId === grantId) store.delete(key);
    }
  };
}

function freshCounters() {
  return {
    authorization: 0, auth_requests: 0, interactions: 0, token_requests: 0,
    token_grants: { authorization_code: 0, refresh_token: 0, device_code: 0, password: 0, client_credentials: 0 },
    token_errors: {}, refresh_reuse_detected: 0, grants_revoked: 0, revocations: 0, admin_revocations: 0,
    discovery: 0, jwks: 0, userinfo: 0, device_authorization: 0, introspection: 0, logins: 0, login_failures: 0,
    otp_failures: 0, consent_shown: 0, consent_denied: 0, key_rotations: 0, faults_applied: 0,
    pushed_authorization: 0,
  };
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (title, body) => `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head>`
  + `<body><h1>${esc(title)}</h1>${body}</body></html>`;

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => { size += c.length; if (size > 1 << 20) req.destroy(); else chunks.push(c); });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

// Let the real handler answer, then rewrite its JSON body with fn (the status and other headers stay).
function rewriteJson(res, fn) {
  const end = res.end.bind(res);
  res.end = (chunk, ...rest) => {
    if (chunk === undefined || chunk === null || res.headersSent) return end(chunk, ...rest);
    let body;
    try { body = JSON.stringify(fn(JSON.parse(Buffer.from(chunk).toString('utf8')))); } catch { return end(chunk, ...rest); }
    res.setHeader('content-length', Buffer.byteLength(body));
    return end(body, ...rest.filter((r) => typeof r === 'function'));
  };
}

function send(res, status, body, type = 'application/json') {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(text);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const raw = args.configFile ? readFileSync(args.configFile, 'utf8') : (process.env.BROKERD_TEST_PROVIDER_CONFIG || '{}');
  const cfg = { ...DEFAULTS, ...JSON.parse(raw) };
  const users = new Map(Object.entries(cfg.users).map(([n, u]) => [n, { sub: subFor(n), ...u }]));
  const state = { counters: freshCounters(), faults: new Map(), lastAuth: null, keys: [newSigningKey(cfg.signing_key)],
    cookieKeys: [randomBytes(32).toString('hex')] };
  const pending = new Map(); // interaction uid -> username that passed the password step
  const store = new Map();
  const Adapter = makeAdapterClass(store);
  const userBySub = (sub) => [...users].find(([, u]) => u.sub === sub);

  const server = createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(args.port, '127.0.0.1', resolve);
  });
  const issuer = `http://127.0.0.1:${server.address().port}`;
  let provider = build();
  let handler = provider.callback();

  function claimsFor(sub, use, scope, requested) {
    const found = userBySub(sub);
    if (!found) return undefined;
    const [name, u] = found;
    const all = {
      sub, email: u.email, email_verified: u.email_verified ?? true, name: u.name ?? name,
      preferred_username: name, groups: u.groups ?? [],
    };
    if (use !== 'id_token') return all;
    // Authelia 4.39: only the configured claims plus those asked for through the claims parameter.
    const allowed = new Set(['sub', ...cfg.id_token_claims, ...Object.keys(requested || {})]);
    if (cfg.groups_in_id_token) allowed.add('groups');
    return Object.fromEntries(Object.entries(all).filter(([k]) => allowed.has(k)));
  }

  async function findAccount(ctx, sub) {
    if (!userBySub(sub)) return undefined;
    return { accountId: sub, claims: async (use, scope, requested) => claimsFor(sub, use, scope, requested) };
  }

  function build() {
    const p = new Provider(issuer, {
      adapter: Adapter,
      clients: [{ ...KUBE_LOGIN, ...cfg.default_client }, ...cfg.clients],
      jwks: { keys: state.keys },
      cookies: { keys: state.cookieKeys }, // kept across key rotation so browser sessions survive it
      scopes: ['openid', 'offline_access', 'groups', 'email', 'profile'],
      claims: {
        openid: ['sub'], email: ['email', 'email_verified'], profile: ['name', 'preferred_username'],
        groups: ['groups'],
      },
      conformIdTokenClaims: false,
      responseTypes: ['code'],
      pkce: { required: () => cfg.pkce_required },
      findAccount,
      // Only the grant this very interaction produced: every authorization goes through the consent step,
      // like Authelia asking again on each login that wants offline_access.
      loadExistingGrant: async (ctx) => {
        const id = ctx.oidc.result?.consent?.grantId;
        return id ? ctx.oidc.provider.Grant.find(id) : undefined;
      },
      expiresWithSession: async () => false,
      issueRefreshToken: async (ctx, client, code) => {
        if (!client.grantTypeAllowed('refresh_token') || cfg.refresh_tokens === 'never') return false;
        return cfg.refresh_tokens === 'always' || code.scopes.has('offline_access');
      },
      rotateRefreshToken: () => cfg.rotate_refresh_tokens,
      ttl: {
        AccessToken: cfg.access_token_ttl, ClientCredentials: cfg.access_token_ttl, IdToken: cfg.id_token_ttl,
        RefreshToken: cfg.refresh_token_ttl, AuthorizationCode: cfg.auth_code_ttl, DeviceCode: cfg.device_code_ttl,
        Interaction: 600, Session: 86400, Grant: 86400,
      },
      enabledJWA: {
        clientAuthSigningAlgValues: cfg.client_auth_signing_algs,
        idTokenEncryptionAlgValues: ['RSA-OAEP', 'RSA-OAEP-256', 'ECDH-ES', 'ECDH-ES+A128KW', 'ECDH-ES+A256KW'],
      },
      features: {
        devInteractions: { enabled: false },
        pushedAuthorizationRequests: { enabled: cfg.par, requirePushedAuthorizationRequests: false },
        jwtResponseModes: { enabled: cfg.jarm },
        encryption: { enabled: cfg.encryption },
        claimsParameter: { enabled: true },
        revocation: { enabled: true },
        introspection: { enabled: true },
        clientCredentials: { enabled: true },
        deviceFlow: {
          enabled: true,
          userCodeInputSource: async (ctx, form, out, err) => {
            const msg = err ? `<p id="error">${esc(out?.error_description || out?.error || 'error')}</p>` : '';
            ctx.body = page('Device sign-in', `${msg}${form.replace('</form>', '<button type="submit">Continue</button></form>')}`);
          },
          userCodeConfirmSource: async (ctx, form, client, info, userCode) => {
            const buttons = '<button type="submit">Confirm</button><button type="submit" name="abort" value="yes">Abort</button>';
            ctx.body = page('Confirm device', `<p>Code: <code>${esc(userCode)}</code></p>${form.replace('</form>', `${buttons}</form>`)}`);
          },
          successSource: async (ctx) => { ctx.body = page('Device sign-in complete', '<p id="done">You can close this page.</p>'); },
        },
      },
      renderError: async (ctx, out) => {
        ctx.type = 'html';
        ctx.body = page('Error', `<p id="error">${esc(out.error)}: ${esc(out.error_description ?? '')}</p>`);
      },
      interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
    });
    const c = () => state.counters;
    p.on('interaction.started', (ctx) => {
      c().interactions += 1;
      if (ctx.oidc.route === 'authorization') c().authorization += 1; // not the resume after login
    });
    p.on('grant.success', (ctx) => {
      const gt = ctx.oidc.params.grant_type === DEVICE_GRANT ? 'device_code' : ctx.oidc.params.grant_type;
      c().token_grants[gt] = (c().token_grants[gt] ?? 0) + 1;
    });
    p.on('grant.error', (ctx, err) => {
      c().token_errors[err.error] = (c().token_errors[err.error] ?? 0) + 1;
      if (err.error_detail === 'refresh token already used') c().refresh_reuse_detected += 1;
    });
    p.on('grant.revoked', () => { c().grants_revoked += 1; });
    p.on('server_error', (ctx, err) => { process.stderr.write(`provider server_error: ${err.stack}\n`); });
    p.registerGrantType('password', passwordGrant, ['username', 'password', 'scope']);
    return p;
  }

  // Resource-owner password grant: oidc-provider has none built in. Mirrors what the code grant issues.
  async function passwordGrant(ctx) {
    const p = ctx.oidc.provider;
    const { username, password } = ctx.oidc.params;
    const u = users.get(username ?? '');
    if (!u || u.password !== password) throw new errors.InvalidGrant('invalid resource owner credentials');
    const client = ctx.oidc.client;
    const known = new Set(['openid', 'offline_access', 'groups', 'email', 'profile']);
    const scope = (ctx.oidc.params.scope ?? 'openid').split(' ').filter((s) => known.has(s)).join(' ');
    const grant = new p.Grant({ accountId: u.sub, clientId: client.clientId });
    grant.addOIDCScope(scope);
    const grantId = await grant.save();
    const account = await findAccount(ctx, u.sub);
    ctx.oidc.entity('Account', account);
    const at = new p.AccessToken({ accountId: u.sub, client, grantId, gty: 'password', scope });
    const accessToken = await at.save();
    let refreshToken;
    const scopes = new Set(scope.split(' '));
    if (client.grantTypeAllowed('refresh_token') && cfg.refresh_tokens !== 'never'
        && (cfg.refresh_tokens === 'always' || scopes.has('offline_access'))) {
      refreshToken = await new p.RefreshToken({
        accountId: u.sub, client, grantId, gty: 'password', scope, rotations: 0, authTime: Math.floor(Date.now() / 1000),
      }).save();
    }
    let idToken;
    if (scopes.has('openid')) {
      const token = new p.IdToken(await account.claims('id_token', scope, {}, []), { ctx });
      token.scope = scope;
      idToken = await token.issue({ use: 'idtoken' });
    }
    ctx.body = {
      access_token: accessToken, token_type: 'Bearer', expires_in: at.expiration, scope,
      ...(idToken ? { id_token: idToken } : {}), ...(refreshToken ? { refresh_token: refreshToken } : {}),
    };
  }

  async function interaction(req, res, url) {
    const details = await provider.interactionDetails(req, res);
    const { uid, prompt, params } = details;
    const action = url.pathname.split('/')[3] ?? '';
    const form = req.method === 'POST' ? new URLSearchParams(await readBody(req)) : new URLSearchParams();
    const finish = (result) => provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
    const html = (title, body) => send(res, 200, page(title, body), 'text/html; charset=utf-8');
    const c = state.counters;
    if (prompt.name === 'login') {
      if (action === 'login') {
        const name = form.get('username') ?? '';
        const u = users.get(name);
        if (!u || u.password !== form.get('password')) {
          c.login_failures += 1;
          return html('Sign in', `<p id="error">Incorrect username or password.</p>${loginForm(uid, name)}`);
        }
        if (!cfg.two_factor) { c.logins += 1; return finish({ login: { accountId: u.sub, amr: ['pwd'] } }); }
        pending.set(uid, name);
        return html('Two-factor authentication', otpForm(uid, ''));
      }
      if (action === 'otp' && pending.has(uid)) {
        if (form.get('otp') !== String(cfg.otp)) {
          c.otp_failures += 1;
          return html('Two-factor authentication', otpForm(uid, '<p id="error">Incorrect one-time code.</p>'));
        }
        const name = pending.get(uid);
        pending.delete(uid);
        c.logins += 1;
        return finish({ login: { accountId: users.get(name).sub, amr: ['pwd', 'otp'] } });
      }
      return html('Sign in', loginForm(uid, params.login_hint ?? ''));
    }
    if (prompt.name === 'consent') {
      const scopes = String(params.scope ?? '').split(' ');
      const ask = cfg.consent === 'always' || (cfg.consent === 'offline_access' && scopes.includes('offline_access'));
      if (ask && action !== 'consent') {
        c.consent_shown += 1;
        return html('Consent', `<p>The application <b>${esc(params.client_id)}</b> asks for: `
          + `<span id="scopes">${esc(scopes.join(' '))}</span></p>`
          + `<form method="post" action="/interaction/${uid}/consent">`
          + '<button type="submit" name="decision" value="accept">Accept</button>'
          + '<button type="submit" name="decision" value="deny">Deny</button></form>');
      }
      if (ask && form.get('decision') !== 'accept') {
        c.consent_denied += 1;
        return finish({ error: 'access_denied', error_description: 'The resource owner denied the request' });
      }
      const grant = details.grantId ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
      const d = prompt.details;
      if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
      if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
      for (const [ind, sc] of Object.entries(d.missingResourceScopes ?? {})) grant.addResourceScope(ind, sc.join(' '));
      return finish({ consent: { grantId: await grant.save() } });
    }
    return send(res, 400, page('Error', `<p id="error">unknown prompt ${esc(prompt.name)}</p>`), 'text/html');
  }

  const loginForm = (uid, hint) => `<form method="post" action="/interaction/${uid}/login">`
    + `<label>Username <input type="text" name="username" value="${esc(hint)}"></label>`
    + '<label>Password <input type="password" name="password"></label>'
    + '<button type="submit">Sign in</button></form>';
  const otpForm = (uid, msg) => `${msg}<form method="post" action="/interaction/${uid}/otp">`
    + '<label>One-time code <input type="text" name="otp" inputmode="numeric" autocomplete="one-time-code"></label>'
    + '<button type="submit">Verify</button></form>';

  // Authelia (fosite) rejects short state/nonce; oidc-provider does not, so check before handing over.
  function entropyCheck(res, url) {
    const q = url.searchParams;
    const client = [{ ...KUBE_LOGIN, ...cfg.default_client }, ...cfg.clients].find((x) => x.client_id === q.get('client_id'));
    const bad = ['state', 'nonce'].find((k) => (k === 'state' || q.has(k)) && (q.get(k) ?? '').length < cfg.min_state_length);
    if (!bad || !client) return false;
    const redirect = q.get('redirect_uri');
    if (redirect && client.redirect_uris.includes(redirect)) {
      const to = new URL(redirect);
      to.searchParams.set('error', `invalid_${bad}`);
      to.searchParams.set('error_description', `${bad} must be at least ${cfg.min_state_length} characters`);
      if (q.has('state')) to.searchParams.set('state', q.get('state'));
      to.searchParams.set('iss', issuer);
      res.writeHead(303, { location: to.href });
      res.end();
    } else {
      send(res, 400, page('Error', `<p id="error">invalid_${bad}</p>`), 'text/html');
    }
    return true;
  }

  // oidc-provider follows OIDC Core and drops offline_access unless prompt=consent; Authelia keeps it and
  // shows consent anyway. Adding prompt=consent gives Authelia's outcome (consent runs every time regardless).
  function offlineNeedsNoPrompt(req, url) {
    const q = url.searchParams;
    if (!(q.get('scope') ?? '').split(' ').includes('offline_access')) return;
    const prompts = new Set((q.get('prompt') ?? '').split(' ').filter(Boolean));
    if (prompts.has('none') || prompts.has('consent')) return;
    prompts.add('consent');
    q.set('prompt', [...prompts].join(' '));
    req.url = `${url.pathname}?${q}`;
  }

  async function control(req, res, url) {
    const body = req.method === 'POST' ? await readBody(req) : '';
    const json = body ? JSON.parse(body) : {};
    const route = `${req.method} ${url.pathname.slice('/__test/'.length)}`;
    switch (route) {
      case 'GET counters': return send(res, 200, state.counters);
      case 'POST reset': state.counters = freshCounters(); return send(res, 200, { ok: true });
      case 'GET last_auth': return send(res, 200, state.lastAuth ?? {});
      case 'GET last_pushed': return send(res, 200, state.lastPushed ?? {});
      case 'POST fault': {
        const target = json.target;
        if (!Object.values(KIND_BY_PATH).includes(target)) return send(res, 400, { error: `bad target ${target}` });
        state.faults.set(target, { ...json, remaining: json.count === undefined ? 1 : json.count });
        return send(res, 200, { ok: true });
      }
      case 'POST faults/clear': case 'DELETE faults/clear': case 'DELETE faults':
        state.faults.clear(); return send(res, 200, { ok: true });
      case 'POST rotate_keys': {
        const fresh = newSigningKey(json.key);
        state.keys = json.keep_old ? [fresh, ...state.keys] : [fresh];
        state.counters.key_rotations += 1;
        provider = build();
        handler = provider.callback();
        return send(res, 200, { kid: state.keys[0].kid, kids: state.keys.map((k) => k.kid) });
      }
      case 'POST revoke_all': {
        const u = users.get(json.user ?? '');
        if (!u) return send(res, 404, { error: 'unknown user' });
        let removed = 0;
        for (const [key, e] of store) if (e.payload.accountId === u.sub) { store.delete(key); removed += 1; }
        state.counters.admin_revocations += 1;
        return send(res, 200, { removed });
      }
      case 'POST set_user': {
        users.set(json.name, { sub: subFor(json.name), ...(users.get(json.name) ?? {}), ...json.fields });
        return send(res, 200, { sub: users.get(json.name).sub });
      }
      case 'GET users':
        return send(res, 200, Object.fromEntries([...users].map(([n, u]) => [n, { sub: u.sub, groups: u.groups ?? [] }])));
      default: return send(res, 404, { error: `no control route ${route}` });
    }
  }

  // Returns true when the fault consumed the request.
  async function applyFault(req, res, kind, form) {
    const f = state.faults.get(kind);
    if (!f || f.remaining === 0) return false;
    if (f.grant_type) {
      const gt = form?.get('grant_type') === DEVICE_GRANT ? 'device_code' : form?.get('grant_type');
      if (gt !== f.grant_type) return false;
    }
    if (typeof f.remaining === 'number' && f.remaining > 0) f.remaining -= 1;
    state.counters.faults_applied += 1;
    switch (f.kind) {
      case 'delay': await new Promise((r) => { setTimeout(r, (f.seconds ?? 1) * 1000); }); return false;
      case 'drop': req.socket.destroy(); return true;
      case 'empty_body': res.writeHead(f.status ?? 200, { 'content-type': 'application/json' }); res.end(); return true;
      case 'nonstandard_error': send(res, f.status ?? 400, f.body ?? { error: 'weird' }); return true;
      case 'html': send(res, f.status ?? 200, page('Proxy', '<p>not json</p>'), 'text/html'); return true;
      case 'bad_id_token':  // the grant is processed for real (a refresh token rotates); the ID token's signature is broken
        rewriteJson(res, (doc) => {
          if (typeof doc.id_token === 'string') doc.id_token = `${doc.id_token.slice(0, -6)}AAAAAA`;
          return doc;
        });
        return false;
      default: send(res, f.status ?? 500, f.body ?? { error: 'server_error', error_description: 'injected fault' });
        return true;
    }
  }

  // oidc-provider accepts client_secret_post and _basic interchangeably; Authelia holds a client to its
  // registered method and answers invalid_client otherwise.
  function wrongAuthMethod(req, res, form) {
    const header = req.headers.authorization ?? '';
    let clientId = form.get('client_id');
    if (/^basic /i.test(header)) {
      const decoded = Buffer.from(header.slice(6).trim(), 'base64').toString('utf8');
      try { clientId = decodeURIComponent(decoded.split(':')[0].replace(/\+/g, ' ')); } catch { return false; }
    }
    const client = [{ ...KUBE_LOGIN, ...cfg.default_client }, ...cfg.clients].find((x) => x.client_id === clientId);
    const registered = client?.token_endpoint_auth_method ?? 'client_secret_basic';
    if (!client || !['client_secret_basic', 'client_secret_post'].includes(registered)) return false;
    let used = 'none';
    if (/^basic /i.test(header)) used = 'client_secret_basic';
    else if (form.has('client_secret')) used = 'client_secret_post';
    if (used === registered) return false;
    send(res, 401, {
      error: 'invalid_client',
      error_description: `client authentication used ${used}, but the client is registered for ${registered}`,
    });
    return true;
  }

  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    const handle = async () => {
      if (url.pathname.startsWith('/__test/')) return control(req, res, url);
      if (url.pathname.startsWith('/interaction/')) return interaction(req, res, url);
      const kind = KIND_BY_PATH[url.pathname];
      let form;
      if (req.method === 'POST' && CLIENT_AUTH_KINDS.has(kind)) {
        // Read the body here (faults filter on grant_type); oidc-provider then takes it from req.body.
        req.body = await readBody(req);
        form = new URLSearchParams(req.body);
      }
      if (kind === 'auth' && req.method === 'GET') {
        state.counters.auth_requests += 1;
        state.lastAuth = Object.fromEntries(url.searchParams);
      } else if (kind === 'token') state.counters.token_requests += 1;
      else if (kind === 'revocation') state.counters.revocations += 1;
      else if (kind === 'pushed_authorization') {
        state.counters.pushed_authorization += 1;
        // What was pushed, without the client's credentials: tests check what stayed out of the browser.
        state.lastPushed = Object.fromEntries([...form].filter(([k]) => !['client_secret', 'client_assertion'].includes(k)));
      }
      else if (kind) state.counters[kind] += 1;
      if (kind === 'discovery' && Object.keys(cfg.discovery_overrides).length) {
        rewriteJson(res, (doc) => ({ ...doc, ...cfg.discovery_overrides }));
      }
      if (kind === 'token' && cfg.refresh_expires_field) {
        rewriteJson(res, (doc) => (typeof doc.refresh_token === 'string'
          ? { ...doc, [cfg.refresh_expires_field]: cfg.refresh_token_ttl } : doc));
      }
      if (kind && await applyFault(req, res, kind, form)) return undefined;
      if (form && wrongAuthMethod(req, res, form)) return undefined;
      if (kind === 'auth' && req.method === 'GET' && !url.searchParams.has('request_uri')) {
        if (entropyCheck(res, url)) return undefined;
        offlineNeedsNoPrompt(req, url);
      }
      if (kind === 'pushed_authorization' && form) {
        // The same Authelia rules for a pushed request: its parameters arrive here instead of in the browser.
        const pushed = new URL(`${issuer}/auth?${form}`);
        const bad = ['state', 'nonce'].find((k) => (k === 'state' || form.has(k)) && (form.get(k) ?? '').length < cfg.min_state_length);
        if (bad) return send(res, 400, { error: 'invalid_request', error_description: `${bad} is too short` });
        const fake = { url: '' };
        offlineNeedsNoPrompt(fake, pushed);
        if (fake.url) req.body = fake.url.split('?')[1];
      }
      return handler(req, res);
    };
    handle().catch((err) => {
      process.stderr.write(`test provider error on ${url.pathname}: ${err.stack}\n`);
      if (!res.headersSent) send(res, 500, page('Error', `<p id="error">${esc(err.message)}</p>`), 'text/html');
      else res.destroy();
    });
  });
  process.on('SIGTERM', () => { server.close(); process.exit(0); });
  process.stdout.write(`${issuer}\n`);
}

main().catch((err) => { process.stderr.write(`test provider failed to start: ${err.stack}\n`); process.exit(1); });
