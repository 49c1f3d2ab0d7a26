# Fixture plugins. Add yours with pytest_plugins.append("tests.support.<module>") on a new line
# (a second `pytest_plugins = [...]` would replace this list).
pytest_plugins = ["tests.support.s3_fixtures"]
pytest_plugins.append("tests.support.trainer_fixtures")
