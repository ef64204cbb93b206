"""The command-line conventions of every script and tool: one-line user errors (exit code 2), the argparse
parser that reports them, and help that shows each default once. Imports only the standard library, so that
`--help` and a mistyped flag answer before torch (or numpy, PIL...) is loaded. Depends on nothing of ours."""
import argparse
import sys

HEAVY_MODULES = ("torch", "torchvision", "numpy", "PIL", "matplotlib", "scipy", "sklearn", "requests")


class UserError(Exception):
    """A problem with the user's input (flag, data, checkpoint): reported as one line, exit code 2."""


def user_error_line(exc):
    """The one-line message of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    text = str(exc).strip()
    marker = f"{type(exc).__name__}: "
    if marker in text:  # DataLoader wraps worker exceptions as "Caught UserError ... Traceback ... UserError: msg"
        text = text[text.rindex(marker) + len(marker):]
    return text.splitlines()[0] if text else type(exc).__name__


def run_main(main, args):
    """Run a script's main(args): a user error becomes one line on stderr and exit code 2."""
    try:
        main(args)
    except UserError as exc:
        print(f"error: {user_error_line(exc)}", file=sys.stderr)
        sys.exit(2)


def shown_default(value):
    """A default as a user would type it: lists space-separated, strings bare."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown_default(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 1.0 -> 1, as "(reference: 1)" writes it
    return str(value)


class DefaultsOnce:
    """Help formatter mixin: every option's help states its default exactly once. "(reference: V)" where V is
    also the default becomes "(default and reference: V)"; a help that already speaks of its default, or an
    option without a default (None) or a plain on/off switch, is left alone (never "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or default == [] or "default" in text.lower()
                or action.nargs == 0
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        shown = shown_default(default).replace("%", "%%")  # argparse %-expands help strings
        reference = f"(reference: {shown})"
        if reference in text:
            return text.replace(reference, f"(default and reference: {shown})")
        return f"{text} (default: {shown})"


class HelpFormatter(DefaultsOnce, argparse.HelpFormatter):
    pass


class RawDescriptionHelpFormatter(DefaultsOnce, argparse.RawDescriptionHelpFormatter):
    pass


# what a parser asking for argparse's formatters gets instead (ArgumentDefaults would print "(default: None)")
FORMATTERS = {None: HelpFormatter, argparse.HelpFormatter: HelpFormatter,
              argparse.ArgumentDefaultsHelpFormatter: HelpFormatter,
              argparse.RawDescriptionHelpFormatter: RawDescriptionHelpFormatter}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other user error of the project, and whose help shows
    each default once."""

    def __init__(self, *args, **kwargs):
        kind = kwargs.get("formatter_class")
        kwargs["formatter_class"] = FORMATTERS.get(kind, kind)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_alias(parser, name, *aliases):
    """Accept other spellings of an existing option (same destination, same meaning), e.g. --output_dir for
    --dump_path; the aliases are listed in the option's help line."""
    action = next(a for a in parser._actions if f"--{name}" in a.option_strings)
    for alias in aliases:
        action.option_strings.append(alias)
        parser._option_string_actions[alias] = action
