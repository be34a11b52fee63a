"""Auth managers for end-to-end tests (loaded by the api-server through ``[core] auth_manager``).

SimpleAuthManager gives connection access (read and edit) only to the ``op`` and ``admin``
roles, so "may read connections but not edit them" cannot be set up with it alone.
:class:`ConnectionReaderAuthManager` adds exactly that: the ``viewer`` role may ``GET``
connections (nothing else changes). Users and passwords come from the usual
``[core] simple_auth_manager_users`` and the passwords file; passwords for users other than
the harness's admin are taken from ``PAPERTRAIL_E2E_PASSWORDS`` (JSON) and written to the
file before SimpleAuthManager would generate (and print) them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

PASSWORDS_ENV = "PAPERTRAIL_E2E_PASSWORDS"


class ConnectionReaderAuthManager(SimpleAuthManager):
    """SimpleAuthManager, plus: role ``viewer`` may read (GET) connections."""

    def init(self) -> None:
        extra = json.loads(os.environ.get(PASSWORDS_ENV) or "{}")
        if extra:
            path = self.get_generated_password_file()
            try:
                with open(path) as fh:
                    current = json.loads(fh.read() or "{}")
            except FileNotFoundError:
                current = {}
            if any(current.get(user) != password for user, password in extra.items()):
                current.update(extra)
                with open(path, "w") as fh:
                    fh.write(json.dumps(current) + "\n")
        super().init()

    def is_authorized_connection(self, *, method: Any, user: Any, details: Any = None) -> bool:
        if method == "GET" and (user.role or "").lower() == "viewer":
            return True
        return super().is_authorized_connection(method=method, user=user, details=details)
