"""extraction: which connections papertrail_extract_many extracts (the conn_ids param, else the
Variable), and the checks that fail a bad list at once, naming what to fix. The DAG itself runs in
tests/integration/test_extract_many_dag.py."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_papertrail.extraction import CONN_IDS_VARIABLE, organisation_conn_ids
from airflow_papertrail.snapshots import organisation_base_path


def _no_variable(key: str) -> str | None:
    return None


def test_the_param_wins_over_the_variable():
    assert organisation_conn_ids(["client_a", "client_b"], read_variable=lambda key: '["other"]') == [
        "client_a",
        "client_b",
    ]


@pytest.mark.parametrize("not_given", [None, []])
def test_without_the_param_the_variable_is_the_list(not_given):
    assert organisation_conn_ids(not_given, read_variable=lambda key: '["client_a", "client_b"]') == [
        "client_a",
        "client_b",
    ]


def test_the_variable_from_the_environment(monkeypatch):
    """The real Variable.get (no supervisor here: an AIRFLOW_VAR_* value, as a secrets backend would give)."""
    monkeypatch.setenv(f"AIRFLOW_VAR_{CONN_IDS_VARIABLE.upper()}", json.dumps(["client_a", "client_b"]))
    assert organisation_conn_ids(None) == ["client_a", "client_b"]


def test_no_param_and_no_variable_says_what_to_set():
    with pytest.raises(AirflowFailException) as caught:
        organisation_conn_ids(None, read_variable=_no_variable)
    message = str(caught.value)
    assert message.startswith("no connections to extract: set the Airflow Variable papertrail_extract_many_conn_ids")
    assert """airflow variables set papertrail_extract_many_conn_ids '["client_a", "client_b"]'""" in message
    assert 'conf {"conn_ids": ["client_a", "client_b"]}' in message


def test_a_variable_that_is_not_json():
    with pytest.raises(AirflowFailException, match=r"papertrail_extract_many_conn_ids is not JSON \(Expecting value"):
        organisation_conn_ids(None, read_variable=lambda key: "client_a, client_b")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("client_a", r"^the conn_ids param must be a list of papertrail connection ids, .* got str$"),
        ({"a": 1}, r"must be a list of papertrail connection ids, .* got dict$"),
        (["client_a", 7], r"^the conn_ids param\[1\] is 7: every item must be a papertrail connection id"),
        (["client_a", ""], r"^the conn_ids param\[1\] is \"\": every item"),
        ([" client_a"], r"^the conn_ids param\[0\] is \" client_a\": .* without surrounding spaces$"),
        ([None], r"^the conn_ids param\[0\] is null: every item"),
        (
            ["client_a", "client_b", "client_a", "client_b"],
            r"^the conn_ids param lists 'client_a', 'client_b' more than once: each organisation's connection",
        ),
        (
            ["client:a", "client_a"],
            r"'client:a' and 'client_a' would share the output folder 'client_a' \(every character outside",
        ),
    ],
)
def test_a_bad_param_fails_naming_the_item(value, message):
    with pytest.raises(AirflowFailException, match=message):
        organisation_conn_ids(value, read_variable=_no_variable)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", r"^the Airflow Variable papertrail_extract_many_conn_ids is an empty list: give at least one"),
        ('"client_a"', r"^the Airflow Variable papertrail_extract_many_conn_ids must be a list"),
        ('["a", "a"]', r"^the Airflow Variable papertrail_extract_many_conn_ids lists 'a' more than once"),
    ],
)
def test_a_bad_variable_fails_naming_the_variable(text, message):
    with pytest.raises(AirflowFailException, match=message):
        organisation_conn_ids(None, read_variable=lambda key: text)


def test_more_connections_than_one_mapped_group_may_expand_to(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "3")
    assert organisation_conn_ids(["a", "b", "c"]) == ["a", "b", "c"]
    with pytest.raises(AirflowFailException, match=r"lists 4 connections, more than \[core\] max_map_length = 3"):
        organisation_conn_ids(["a", "b", "c", "d"])


def test_organisation_base_path():
    assert organisation_base_path("s3://conn@bucket/pt/", "client_a") == "s3://conn@bucket/pt/client_a"
    assert organisation_base_path("/data", "client:a é") == "/data/client_a__"


def test_a_copy_of_the_dag_reads_its_own_variable():
    variables = {"papertrail_extract_many_conn_ids_part_2": '["client_z"]'}
    assert organisation_conn_ids(
        None, variable="papertrail_extract_many_conn_ids_part_2", read_variable=variables.get
    ) == ["client_z"]
    with pytest.raises(
        AirflowFailException, match="set the Airflow Variable papertrail_extract_many_conn_ids_part_3 to"
    ):
        organisation_conn_ids(None, variable="papertrail_extract_many_conn_ids_part_3", read_variable=variables.get)
