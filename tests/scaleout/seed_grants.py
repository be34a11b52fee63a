"""Store grants in the topology's metadata DB through the token store (run by ``ScaleoutTopology.python``).

Reads ``[{"conn_id", "token": Token.to_dict(), "issued_for": binding}]`` as JSON on stdin, saves
each with :class:`~airflow_papertrail.token_store.VariableTokenStore` on the metadata DB
(``OrmVariables``, the keys of ``[papertrail] token_encryption_keys``), and prints
``{conn_id: generation}``. Tokens travel on stdin only, never in argv or the environment.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from airflow_papertrail.oauth.tokens import Token
    from airflow_papertrail.token_store import OrmVariables, VariableTokenStore

    generations = {}
    for item in json.load(sys.stdin):
        store = VariableTokenStore(item["conn_id"], backend=OrmVariables())
        grant = store.save(Token.from_dict(item["token"]), issued_for=item.get("issued_for"))
        generations[item["conn_id"]] = grant.generation
    print(json.dumps(generations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
