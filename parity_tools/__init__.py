"""Tools run by hand or by the nightly job: the benchmark, the determinism check, the
mutation run, the hostile-input and full-size Perceiver measurements (`python -m parity_tools.<name>`)."""
