"""`safevlm policy show | validate`: what a policy does, and whether policy files are valid."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "policy",
        help="Show what a policy does per risk type, or validate policy files.",
        description="Policies map the safety head's probabilities to allow / hint / refuse (docs/policy.md). "
        "'show' prints a policy with its 'extends' resolved; 'validate' checks policy files.",
    )
    sub = parser.add_subparsers(dest="policy_command", metavar="<action>")
    show = sub.add_parser("show", help="Print a policy's rules per risk type (extends resolved).",
                          description="Print a policy: per risk type whether it is on, when it hints and when it "
                          "refuses, which types requests may switch off. --json prints the whole resolved policy.")
    show.add_argument("policy", nargs="?", default="default",
                      help="A shipped name (default, strict, hint_only) or a YAML file (default: default).")
    show.add_argument("--json", action="store_true", help="Print the resolved policy as JSON (as from_dict reads it).")
    show.set_defaults(func=command_show)
    validate = sub.add_parser("validate", help="Check policy files; exit status 1 if any is invalid.",
                              description="Load each file as `--policy FILE` would and print 'ok' or the error "
                              "(naming the file and the field). Exit status 0 when all are valid, 1 otherwise.")
    validate.add_argument("files", nargs="+", metavar="FILE", help="Policy YAML files (or shipped names).")
    validate.set_defaults(func=command_validate)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def command_show(args) -> int:
    from safevlm.policy import load_policy, policy_summary

    policy = load_policy(args.policy)
    if args.json:
        print(json.dumps(policy.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(f"policy {policy.name} ({args.policy})")
    if policy.description:
        print(f"  {policy.description}")
    relaxable = ", ".join(policy.relaxable_types) or "none"
    print(f"  hints go in the {policy.hint_position} message; on a head error: {policy.on_error}; "
          f"requests may switch off: {relaxable}")
    summary = policy_summary(policy)
    width = max(len(t) for t in summary)
    print(f"  {'type':<{width}}  {'on':<3}  {'hint when':<20}  refuse when")
    for risk_type, rule in summary.items():
        print(f"  {risk_type:<{width}}  {'yes' if rule['enabled'] else 'no':<3}  {rule['hint'] or 'never':<20}  "
              f"{rule['refuse'] or 'never'}")
    return 0


def command_validate(args) -> int:
    from safevlm.cli import is_user_error
    from safevlm.policy import load_policy

    bad = 0
    for name in args.files:
        try:
            policy = load_policy(name)
        except (ValueError, OSError) as err:
            if not is_user_error(err):
                raise
            bad += 1
            message = str(err) if str(name) in str(err) else f"{name}: {err}"
            print(f"invalid: {message}", file=sys.stderr)
            continue
        print(f"{name}: ok (policy {policy.name})")
    return 1 if bad else 0
