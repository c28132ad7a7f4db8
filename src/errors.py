"""Errors that are the user's to fix: train.py prints their message alone, without a traceback."""


class UserError(Exception):
    """Bad input (config, dataset files, checkpoint): the message names the problem and the fix."""


class ConfigError(UserError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")
