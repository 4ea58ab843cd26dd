"""Test peers: a DSF-compatible FHIR server, certificate minting and the reference inference model.

Used by tests, benchmarks and ``dsf-bridge demo``; never imported by production code paths
(enforced by import-linter).
"""

#: Port of the first organization's server in a sandbox network; the next ones count up. Here,
#: not in ``sites``, so that ``dsf-bridge sandbox init --help`` shows it without importing that.
DEFAULT_BASE_PORT = 8443
