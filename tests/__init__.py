"""distgen's tests: a package, so that pytest puts the repository root on sys.path and every test imports its
helpers as `tests.helpers`; their asserts are rewritten as a test module's are (a failing equality shows
both sides)."""
import pytest

pytest.register_assert_rewrite("tests.helpers")
