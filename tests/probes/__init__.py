"""Programs the suite runs in processes of their own and interrupts (tests/core/test_cleanup.py).
Their file names do not start with test_, so a normal run does not collect them."""
