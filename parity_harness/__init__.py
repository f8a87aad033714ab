"""The parity harness: comparing outputs, goldens, the results file and the report.

The conversion path never imports it (the `matrix` command does); the references
(`fixtures/`) and the tests (`parity_tests/`) do."""
