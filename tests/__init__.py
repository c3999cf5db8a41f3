"""The test suite: a package, so mypy checks it under one name (tests.support...) and conftest is imported once."""
