"""Administration from the command line: organizations, members and dev tokens.

python -m scripts.admin quickstart                 # org + owner + token, printed as shell
python -m scripts.admin create-org "Acme"
python -m scripts.admin add-member ORG_ID USER_ID --role admin --email a@example.com
python -m scripts.admin mint-token USER_ID [--ttl 3600]
"""

from __future__ import annotations

import argparse
import sys

from billing.auth import mint_user_token
from billing.config import ConfigError, get_settings
from billing.organizations import add_member, create_organization
from models import connect_database
from models.migrate import migrate


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
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    db = connect_database(settings.database_url)
    migrate(db)
    with db.connection_context():
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
