"""A hostile browser for the RFC 9207 mix-up tests: logs in like tests/support/browser.py, then delivers the code to
the redirect target with its ``iss`` replaced by ``https://HOST`` (``--iss-host HOST``: no colon, since a BROWSER
command is split on ":") or removed (``--drop-iss``), as a page of another provider would.  Stdlib only; run as
``python tests/support/mixup_browser.py (--iss-host HOST | --drop-iss) URL``.
Exit status 0 when the tampered redirect was delivered (whatever the target answered), 1 otherwise."""

from __future__ import annotations

import argparse
import sys
import urllib.parse

# Run as a script beside browser.py (its directory is sys.path[0]), as chromium_login.py is.
from browser import BrowserError, StandInBrowser, login  # type: ignore[import-not-found]


def tampered(callback_url: str, iss: str | None) -> str:
    parts = urllib.parse.urlsplit(callback_url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "iss"]
    if iss is not None:
        query.append(("iss", iss))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--iss-host")
    group.add_argument("--drop-iss", action="store_true")
    ap.add_argument("url")
    args = ap.parse_args(argv)
    try:
        landed = login(args.url, follow_callback=False, timeout=30)
        iss = f"https://{args.iss_host}" if args.iss_host else None
        status, _, _ = StandInBrowser().request("GET", tampered(landed.callback_url, iss))
    except (BrowserError, OSError) as exc:
        print(f"mix-up browser: {exc}", file=sys.stderr)
        return 1
    print(f"delivered the tampered redirect, answered HTTP {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
