"""Boolean command-line flags in both syntaxes: the original repository's `--flag True|False` (its bool_flag) and
this project's `--flag` / `--no-flag`. Depends on nothing of ours."""
import argparse

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def bool_flag(text):
    """'True', 'false', '1', '0', 'yes', 'no' (any case) -> bool; anything else is a one-line argparse error."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean: write True or False")


def add_bool(group, name, default, help):
    """--name (True), --name True|False|1|0|yes|no, and --no-name (False); the default is shown once, by the
    help formatter of util.cli.ArgumentParser."""
    group.add_argument(f"--{name}", nargs="?", const=True, default=default, type=bool_flag, metavar="BOOL",
                       help=help)
    group.add_argument(f"--no-{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
