"""The DSF protocol: Task conventions, authorization, the mutual-TLS FHIR client, the websocket
subscription and catch-up, plugin resource publication, identities and thumbprints."""
