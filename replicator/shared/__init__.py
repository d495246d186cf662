"""Several instances, one source: parts, their assembly into sets, splitting a directory (issue 21)."""
