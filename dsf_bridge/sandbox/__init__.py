"""Test peers: a DSF-compatible FHIR server, certificate minting and the reference inference model.

Used by tests, benchmarks and ``dsf-bridge demo``; never imported by production code paths
(enforced by import-linter).
"""
