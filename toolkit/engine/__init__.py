"""Training engine: mmengine Runner glue and tk's hooks."""
