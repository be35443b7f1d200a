"""Pure logic: no root, no etcd, no namespaces; `pytest tests/unit` is the quick loop."""
