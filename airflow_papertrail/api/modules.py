"""The documented data modules of Papertrail-ai and which of their queries write.

Source: the service's README (see ``/work/shared/papertrail-api.md`` in the project notes).
Each module is one PHP script, ``<api_url>/api_<module>.php``, taking ``system`` and
``query`` parameters. The table is the runtime's own copy; a unit test keeps the shipped
emulator's table identical to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from airflow_papertrail.exceptions import PapertrailConfigurationError

#: Module -> documented queries, in the order of the documentation.
MODULES: dict[str, tuple[str, ...]] = {
    "bank": ("bank_list", "bank_accounts_list"),
    "customers": (
        "list_customers",
        "list_invoices",
        "invoice_detail",
        "create_customer",
        "create_invoice",
        "create_credit_note",
    ),
    "vendors": ("list_vendors", "list_invoices", "create_vendor", "create_invoice"),
    "gl": ("list_gl_transaction", "list_gl_accounts"),
    "accounts": ("account_create", "account_update", "account_delete"),
    "reports": ("trial_balance", "income_statement", "balance_sheet", "cash_flow"),
    "company": ("co_details", "users"),
}

#: Query name prefixes that change data in the accounting system.
WRITE_PREFIXES: tuple[str, ...] = ("create_", "account_")

# The module name becomes part of the URL path: keep it to the characters the service uses.
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def is_list(query: str) -> bool:
    """Whether a read query answers a list of records (``list_*``, ``*_list``, ``users``).

    Its answer must hold the records under ``records_path``: an object without it is
    refused instead of being taken as one record (it is an envelope, or an error)."""
    return query.startswith("list_") or query.endswith("_list") or query == "users"


def is_write(query: str) -> bool:
    """Whether a documented query changes data (``create_*``, ``account_*``)."""
    return query.startswith(WRITE_PREFIXES)


@dataclass(frozen=True)
class QuerySpec:
    """A validated ``(module, query)`` pair.

    :param module: the module, e.g. ``customers``.
    :param query: the query, e.g. ``list_invoices``.
    :param write: the query changes data: sent as a POST with a JSON body and never replayed
        once it may have reached the server.
    :param documented: the pair is in :data:`MODULES` (False only with ``allow_unknown``).
    """

    module: str
    query: str
    write: bool
    documented: bool = True

    @property
    def label(self) -> str:
        return f"{self.module}/{self.query}"


def _valid_listing() -> str:
    return "; ".join(f"{module}: {', '.join(queries)}" for module, queries in MODULES.items())


def validate(module: str, query: str, allow_unknown: bool = False) -> QuerySpec:
    """Check ``(module, query)`` against the documented table.

    :param allow_unknown: accept a module or query the table does not know (the service may
        add some). Such a query is treated as a **write** (POST, never replayed after it may
        have reached the server): the conservative choice when nothing says it is harmless.
    :raises PapertrailConfigurationError: unknown module/query, listing the valid ones.
    """
    if not isinstance(module, str) or not _NAME.fullmatch(module):
        raise PapertrailConfigurationError(
            f"module must be a name made of letters, digits and '_' (it becomes api_<module>.php), got {module!r}"
        )
    if not isinstance(query, str) or not _NAME.fullmatch(query):
        raise PapertrailConfigurationError(
            f"query must be a name made of letters, digits and '_', got {query!r}; valid queries: {_valid_listing()}"
        )
    queries = MODULES.get(module)
    if queries is not None and query in queries:
        return QuerySpec(module, query, is_write(query))
    if allow_unknown:
        return QuerySpec(module, query, write=True, documented=False)
    escape = (
        " If the service added it after this provider was released, pass allow_unknown=True "
        "(an unknown query is sent as a write: POST, never retried once it may have reached the server)."
    )
    if queries is None:
        raise PapertrailConfigurationError(
            f"unknown Papertrail-ai module {module!r}; documented modules and queries: {_valid_listing()}.{escape}"
        )
    raise PapertrailConfigurationError(
        f"unknown query {query!r} for Papertrail-ai module {module!r}; valid queries of {module!r}: "
        f"{', '.join(queries)}.{escape}"
    )


__all__ = ["MODULES", "WRITE_PREFIXES", "QuerySpec", "is_write", "validate"]
