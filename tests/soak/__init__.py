"""The soak: `make soak` (about 10 minutes) and its 1-minute CI run in tests/test_soak.py."""
