"""Test helpers for the Papertrail-ai provider (an offline emulator of the service).

Import :mod:`airflow_papertrail.testing.emulator` explicitly; this package imports nothing.
"""
