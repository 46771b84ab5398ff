import pytest

# The asserts of tests/support explain a failure as the tests' own do: pytest rewrites only
# test modules and conftest.py unless told, before the modules are imported.
pytest.register_assert_rewrite("tests.support")
