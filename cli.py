"""Command-line parsing with the project's error contract."""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `PROG: error: PROBLEM; see --help`, exit status 2:
    argparse's usage block above it would bury the problem in a log."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")
