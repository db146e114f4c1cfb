"""Click commands: a module per command (a stage's own, or one that is not a stage), the generic stage command
(`stage`) for a registered stage without one, and the option groups they share (`common`)."""
