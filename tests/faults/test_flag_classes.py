"""Every flag of pretraining's parser is classified as recipe (compared on resume) or run-only, and the fault
suite's fuzz table draws every flag except those its harness sets itself."""
from arguments import pretrain
from test_fuzzed_command_lines import PRETRAIN_FLAGS

# set by the fuzz harness itself (a fresh folder per example), or too slow to fuzz (torch.compile), or a choice
# that needs data or weights the fuzz world does not hold
NOT_FUZZED = {"--output_dir", "--dump_path", "--compile", "--init_from", "--data_name", "--init", "--sf_moment_dtype",
              "--tensorboard"}  # --tensorboard needs an optional package


def flags(parser):
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_pretraining_flag_is_recipe_or_run_only():
    dests = set(flags(pretrain.get_args_parser()))
    recipe, run_only = set(pretrain.RECIPE_KEYS), set(pretrain.RUN_ONLY_KEYS)
    assert not recipe & run_only, f"both recipe and run-only: {sorted(recipe & run_only)}"
    assert dests - recipe - run_only == set(), "classify in arguments/pretrain.py's RECIPE_KEYS or RUN_ONLY_KEYS"
    assert (recipe | run_only) - dests == set(), "classified keys that are no flag"


def test_the_fuzz_table_covers_every_pretraining_flag():
    options = {a.option_strings[0] for a in pretrain.get_args_parser()._actions if a.option_strings} - {"-h"}
    missing = options - set(PRETRAIN_FLAGS) - NOT_FUZZED
    assert not missing, f"add to tests/faults/test_fuzzed_command_lines.py's PRETRAIN_FLAGS: {sorted(missing)}"
    assert not NOT_FUZZED - options, "NOT_FUZZED names a flag the parser no longer has"
