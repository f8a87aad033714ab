"""Data only for now: the converter comes with its family issue."""
VARIANTS = ()
