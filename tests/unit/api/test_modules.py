"""The documented module table, its write classification and the validation errors."""

from __future__ import annotations

import pytest

from airflow_papertrail.api.modules import MODULES, QuerySpec, is_write, validate
from airflow_papertrail.exceptions import PapertrailConfigurationError
from airflow_papertrail.testing import emulator as emulator_module


def test_table_is_the_emulators_table():
    # The runtime keeps its own copy (it must not import testing code); they must not drift.
    assert MODULES == emulator_module.MODULES
    assert list(MODULES) == list(emulator_module.MODULES)


def test_write_classification_matches_the_emulator():
    documented = {q for queries in MODULES.values() for q in queries}
    assert {q for q in documented if is_write(q)} == set(emulator_module.WRITE_QUERIES)
    assert not is_write("list_invoices") and not is_write("bank_accounts_list")


@pytest.mark.parametrize(("module", "query"), [(m, q) for m, qs in MODULES.items() for q in qs])
def test_every_documented_pair_validates(module, query):
    spec = validate(module, query)
    assert spec == QuerySpec(module, query, write=is_write(query), documented=True)
    assert spec.label == f"{module}/{query}"


def test_unknown_module_lists_the_modules_and_the_escape_hatch():
    with pytest.raises(PapertrailConfigurationError) as err:
        validate("payroll", "list_payslips")
    message = str(err.value)
    assert "unknown Papertrail-ai module 'payroll'" in message
    for module in MODULES:
        assert f"{module}:" in message
    assert "allow_unknown=True" in message


def test_unknown_query_lists_the_modules_queries():
    with pytest.raises(PapertrailConfigurationError) as err:
        validate("vendors", "list_customers")
    message = str(err.value)
    assert "unknown query 'list_customers'" in message
    assert "list_vendors, list_invoices, create_vendor, create_invoice" in message
    assert "allow_unknown=True" in message


@pytest.mark.parametrize(
    ("module", "query"), [("customers", "list_payments"), ("payroll", "list_payslips"), ("accounts", "account_merge")]
)
def test_allow_unknown_treats_the_unknown_as_a_write(module, query):
    spec = validate(module, query, allow_unknown=True)
    assert spec.write is True and spec.documented is False


def test_allow_unknown_does_not_change_documented_reads():
    assert validate("bank", "bank_list", allow_unknown=True).write is False


@pytest.mark.parametrize(
    ("module", "query"),
    [("../token", "bank_list"), ("bank.php", "bank_list"), ("", "bank_list"), ("bank", ""), ("bank", "a&b=c")],
)
def test_names_that_would_change_the_url_are_refused_even_with_allow_unknown(module, query):
    with pytest.raises(PapertrailConfigurationError):
        validate(module, query, allow_unknown=True)
