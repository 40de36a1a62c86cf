"""What the command-line tools share: the project's one-line errors, the memory to plan for."""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `PROG: error: PROBLEM; see --help`, exit status 2:
    argparse's usage block above it would bury the problem in a log."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def available_memory():
    """Bytes the system can still give this process (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
