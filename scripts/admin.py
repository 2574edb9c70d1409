"""Administration from the command line: organizations, members, operators and dev tokens.

python -m scripts.admin quickstart                 # org + owner + token, printed as shell
python -m scripts.admin create-org "Acme"
python -m scripts.admin add-member ORG_ID USER_ID --role admin --email a@example.com
python -m scripts.admin mint-token USER_ID [--ttl 3600]

The service API's directory and operator operations, one command each (same rules, same
idempotency; output is the JSON the API would answer):

python -m scripts.admin put-org ORG_ID NAME
python -m scripts.admin put-member ORG_ID USER_ID --role admin [--email a@example.com]
python -m scripts.admin remove-member ORG_ID USER_ID
python -m scripts.admin adjust-credits ORG_ID AMOUNT --reason TEXT --idempotency-key KEY
python -m scripts.admin suspend ORG_ID --reason TEXT
python -m scripts.admin unsuspend ORG_ID --reason TEXT
python -m scripts.admin audit ORG_ID               # exit status 1 when the ledger is unsound
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from billing import directory, operators
from billing.auth import mint_user_token
from billing.config import ConfigError, Settings, get_settings
from billing.errors import BillingError
from billing.organizations import add_member, create_organization
from models import connect_database
from models.migrate import migrate


def _add_operator_commands(sub: Any) -> None:
    put_org = sub.add_parser("put-org", help="create or rename an organization")
    put_org.add_argument("organization_id")
    put_org.add_argument("name")
    put_member = sub.add_parser("put-member", help="add a member or change their role")
    put_member.add_argument("organization_id")
    put_member.add_argument("user_id")
    put_member.add_argument("--role", choices=["owner", "admin", "member"], required=True)
    put_member.add_argument("--email")
    remove = sub.add_parser("remove-member")
    remove.add_argument("organization_id")
    remove.add_argument("user_id")
    adjust = sub.add_parser("adjust-credits", help="grant (+) or take back (-) credits")
    adjust.add_argument("organization_id")
    adjust.add_argument("amount", type=int, help="decimillicents, signed")
    adjust.add_argument("--reason", required=True)
    adjust.add_argument("--idempotency-key", required=True)
    for name in ("suspend", "unsuspend"):
        action = sub.add_parser(name)
        action.add_argument("organization_id")
        action.add_argument("--reason", required=True)
    audit = sub.add_parser("audit", help="check the organization's ledger invariants")
    audit.add_argument("organization_id")


def _operator_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run a directory/operator command through the same services and shapes as the API."""
    from handlers import shapes

    org = args.organization_id.lower()
    result: dict[str, Any]
    if args.command == "put-org":
        result = shapes.organization(directory.put_organization(org, args.name))
    elif args.command == "put-member":
        result = shapes.member(directory.put_member(org, args.user_id, args.role, args.email))
    elif args.command == "remove-member":
        removal = directory.remove_member(org, args.user_id)
        result = {"organizationId": org, "userId": args.user_id, "removed": removal.removed}
    elif args.command == "adjust-credits":
        adjustment = operators.adjust_credits(
            org,
            amount=args.amount,
            reason=args.reason,
            idempotency_key=args.idempotency_key,
            overdraft=settings.overdraft_limit_decimillicents,
        )
        result = shapes.credit_adjustment(adjustment)
    elif args.command in ("suspend", "unsuspend"):
        change = operators.suspend if args.command == "suspend" else operators.unsuspend
        result = shapes.suspension(change(org, args.reason))
    else:
        audit = operators.audit(org, settings.overdraft_limit_decimillicents)
        result = {"organizationId": org, "sound": not audit.problems, "problems": audit.problems}
        print(json.dumps(result, indent=2))
        return 0 if not audit.problems else 1
    print(json.dumps(result, indent=2))
    return 0


OPERATOR_COMMANDS = {
    "put-org",
    "put-member",
    "remove-member",
    "adjust-credits",
    "suspend",
    "unsuspend",
    "audit",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.admin")
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="create an org with an owner and mint a token")
    quick.add_argument("--name", default="Local Org")
    quick.add_argument("--user", default="dev-user")
    quick.add_argument("--email", default="dev@example.com")
    org = sub.add_parser("create-org")
    org.add_argument("name")
    member = sub.add_parser("add-member")
    member.add_argument("organization_id")
    member.add_argument("user_id")
    member.add_argument("--role", choices=["owner", "admin", "member"], default="member")
    member.add_argument("--email")
    token = sub.add_parser("mint-token")
    token.add_argument("user_id")
    token.add_argument("--email")
    token.add_argument("--ttl", type=int, default=3600)
    _add_operator_commands(sub)
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    db = connect_database(settings.database_url)
    migrate(db)
    with db.connection_context():
        if args.command in OPERATOR_COMMANDS:
            try:
                return _operator_command(args, settings)
            except BillingError as exc:
                print(f"{exc.code}: {exc.detail}", file=sys.stderr)
                return 2
        if args.command == "quickstart":
            organization = create_organization(args.name)
            add_member(organization.id, args.user, "owner", args.email)
            print(f"export ORG_ID={organization.id}")
            print(f"export TOKEN={mint_user_token(args.user, settings, args.email, 24 * 3600)}")
        elif args.command == "create-org":
            print(create_organization(args.name).id)
        elif args.command == "add-member":
            add_member(args.organization_id, args.user_id, args.role, args.email)
            print(f"{args.user_id} is {args.role} of {args.organization_id}")
        elif args.command == "mint-token":
            print(mint_user_token(args.user_id, settings, args.email, args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
