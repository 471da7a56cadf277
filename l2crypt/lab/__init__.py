"""The labs in network namespaces, soak, bench and perf support, and a throwaway PostgreSQL; not in
the wheel: scripts/lab, scripts/soak, scripts/bench and netns_tests/ run it from the source
checkout."""
