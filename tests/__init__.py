"""The test suite, one folder per package of the code it tests; shared helpers in support/."""
