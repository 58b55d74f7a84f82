"""netaccel: the node helper's command line."""


def main() -> int:
    return 0
