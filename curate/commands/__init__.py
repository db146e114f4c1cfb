"""Click commands, one module per stage; shared option groups live in `common`."""
