"""``ctcovid http-credentials``: a line for the node's HTTP credentials file."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ctcovid.cli.common import console, handle_errors


@handle_errors
def http_credentials(
    name: Annotated[str, typer.Argument(help="User or token name (no spaces).")],
    token: Annotated[
        bool, typer.Option("--token", help="Make an API token instead of a user with password.")
    ] = False,
) -> None:
    """Print one line for --http-auth-file: a user (the password is asked for, or read from
    stdin when it is not a terminal; stored as a salted scrypt hash) or, with --token, an API
    token (printed once on stderr; the file keeps its sha256).

    Examples:

      ctcovid http-credentials alice >> /etc/ctcovid/http-users

      ctcovid http-credentials backup-script --token >> /etc/ctcovid/http-users
    """
    from ctcovid.errors import InvalidInputError
    from ctcovid.node.webauth import hash_password, token_line

    if not name or any(c.isspace() for c in name) or "#" in name:
        raise InvalidInputError("the name must not be empty nor hold spaces or '#'")
    if token:
        secret, line = token_line(name)
        console.print(f"token for {name} (shown once): {secret}", highlight=False)
        typer.echo(line)
        return
    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise InvalidInputError("the password must have at least 8 characters")
    typer.echo(f"user {name} {hash_password(password)}")
