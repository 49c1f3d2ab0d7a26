# Fixture plugins. Add yours with pytest_plugins.append("tests.support.<module>") on a new line
# (a second `pytest_plugins = [...]` would replace this list).
pytest_plugins = ["tests.support.s3_fixtures"]
pytest_plugins.append("tests.support.trainer_fixtures")
pytest_plugins.append("tests.support.cluster")

# A test that uses one of these fixtures needs a control plane, an S3 server, a real node or a training
# run (tests/test_safe_loading.py): it is
# `slow` (left out by `make test-fast`) wherever it is. Modules that are slow as a whole say so with
# `pytestmark = pytest.mark.slow`.
SLOW_FIXTURES = frozenset(
    {"cp", "s3_server", "node", "single_run", "deepspeed_run"}
)  # the last two: training runs


def pytest_collection_modifyitems(items: list) -> None:
    """Mark `slow` every test that uses a SLOW_FIXTURES fixture, directly or through another."""
    import pytest

    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
