"""`rung policy`: check a tool-use policy file, dry-run a call against it, hash an API key.

    rung policy check policy.yaml                       # valid? which keys, what each may call
    rung policy check policy.yaml --key ci-bot --tool read_file --arguments '{"path": "../x"}'
    echo -n "$KEY" | rung policy hash-key               # the sha256 to put in the file

A dry run exits 0 when the call is allowed, 1 when it is denied (and names the rule).
"""

from __future__ import annotations

import argparse
import sys

from rung.commands.base import Command, CommandError
from rung.extras import require


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a policy file; with --tool, decide one call")
    check.add_argument("file")
    check.add_argument("--key", default="default", help="the key's name in the file (default: the default rules)")
    check.add_argument("--tool", default=None, help="a tool name to decide")
    check.add_argument("--arguments", default="{}", help="the call's arguments, as JSON (default {})")
    sub.add_parser("hash-key", help="read an API key on stdin, print the SHA-256 a policy file stores")


def _run(args: argparse.Namespace) -> int:
    from rung.govern.policy import hash_key, load_policy

    if args.action == "hash-key":
        key = sys.stdin.read().strip()
        if not key:
            raise CommandError("no key on stdin")
        print(hash_key(key))
        return 0
    require("serve", "yaml", what="rung policy check")  # YAML (or JSON), read as `rung serve --policy` reads it
    policy = load_policy(args.file)
    if args.tool is None:
        print(f"{args.file}: ok (unknown keys: {policy.unknown_keys}, max_rounds: {policy.max_rounds})")
        for name, rules in [("default", policy.default)] + [(n, r) for n, (_, r) in policy.keys.items()]:
            allow = ", ".join(rules.allow) or "(nothing)"
            deny = ", ".join(rules.deny) or "-"
            constrained = ", ".join(glob for glob, _ in rules.arguments) or "-"
            print(f"  {name}: allow {allow}; deny {deny}; argument rules for {constrained}")
        return 0
    decision = policy.rules_of(args.key).call(args.tool, args.arguments)
    verdict = "allow" if decision.allowed else "deny"
    print(f"{verdict} {args.tool} for {args.key}: rule {decision.rule}" + (f" ({decision.reason})" if decision.reason
                                                                         else ""))
    return 0 if decision.allowed else 1


POLICY = Command("policy", "check a tool-use policy file (rung serve --policy) and dry-run calls", _arguments, _run)
