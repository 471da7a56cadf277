"""What operators use with every daemon: metrics, logs, the control socket, status views, and the
systemd units and networkd TAP files in ``l2crypt/ops/systemd/``."""
