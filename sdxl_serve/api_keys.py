"""`sdxl-serve keys`: make a new API key, or hash existing ones, for the gateway's keys file."""

from __future__ import annotations

import argparse
import sys

from common.apikeys import key_line, new_key, new_webhook_secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`keys new [--label L] [--admin] [--webhook-secret]`, `keys hash` and `keys webhook-secret`."""
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="print a new key (give it to the client) and its line for the keys file")
    new.add_argument("--label", default="", help="a comment for the keys-file line, e.g. who holds the key")
    new.add_argument("--admin", action="store_true", help="mark the line `admin`: the key sees every caller's jobs")
    new.add_argument(
        "--webhook-secret",
        action="store_true",
        help="also make the key's webhook signing secret: on its line, and printed third (give it to the client)",
    )
    sub.add_parser("hash", help="read keys on standard input, one per line; print each one's keys-file line")
    sub.add_parser(
        "webhook-secret",
        help="print a new webhook signing secret (whsec_...): for a keys-file line, or the cluster's --webhook-secret",
    )


def run(args: argparse.Namespace) -> int:
    """Print the key and its line (`new`), or a line per key read on standard input (`hash`)."""
    if args.keys_command == "new":
        key = new_key()
        secret = new_webhook_secret() if args.webhook_secret else ""
        print(
            "line 1: the key, for the client (it is stored nowhere); line 2: its line for the keys file"
            + ("; line 3: its webhook secret, for the client to verify webhooks with" if secret else ""),
            file=sys.stderr,
        )
        print(key)
        print(key_line(key, args.label, admin=args.admin, webhook_secret=secret))
        if secret:
            print(secret)
        return 0
    if args.keys_command == "webhook-secret":
        print(new_webhook_secret())
        return 0
    for line in sys.stdin:
        if line.strip():
            print(key_line(line.strip()))
    return 0
