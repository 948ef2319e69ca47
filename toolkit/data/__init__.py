"""Data path: load -> format map fn -> template -> encode -> (pack) -> cache. Each step small and pure."""
