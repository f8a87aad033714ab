"""The parity harness: comparing outputs, goldens, the results file and the report.

The product (`converters`) never imports it; the references (`parity_fixtures`, the
`fixtures/` directory) and the tests (`parity_tests/`) do."""
