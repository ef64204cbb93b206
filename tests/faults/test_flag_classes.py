"""Every flag of each script's parser is classified as recipe (compared on resume) or run-only, and the fault
suite's fuzz tables draw every flag except those their harness sets itself."""
import pytest

from arguments import linear_probe, pretrain
from test_fuzzed_command_lines import PRETRAIN_FLAGS, PROBE_FLAGS

# set by the fuzz harness itself (a fresh folder per example), or too slow to fuzz (torch.compile), or a choice
# that needs data or weights the fuzz world does not hold
NOT_FUZZED = {"--output_dir", "--dump_path", "--compile", "--init_from", "--data_name", "--init", "--sf_moment_dtype",
              "--tensorboard", "--wandb"}  # --tensorboard, --wandb need an optional package (and W&B files)
# the probe's: --dump_path is the harness's fresh folder per example; --download would reach the network (the
# harness passes --no-download); --tensorboard needs an optional package; --device is run-only and its cuda/cpu
# choice depends on the machine; the original's legacy flags are accepted and only logged or refused by name
# (tests/test_original_cli.py runs them)
PROBE_NOT_FUZZED = {"--dump_path", "--download", "--no-download", "--tensorboard", "--no-tensorboard", "--wandb",
                    "--device",
                    "--config", "--dist_url", "--gpu", "--reweight_path", "--headpretrained", "--richway",
                    "--world_size", "--rank", "--local_rank", "--skip_pool", "--save_init",
                    "--compile", "--no-compile",  # torch.compile: too slow to fuzz (tests/test_compile.py runs it)
                    *(f"--{name}" for name in linear_probe.SLURM_KEYS)}  # the original's slurm flags: no effect
PARSERS = {"pretraining": (pretrain, PRETRAIN_FLAGS, NOT_FUZZED, ()),
           "probe": (linear_probe, PROBE_FLAGS, PROBE_NOT_FUZZED, linear_probe.DERIVED_RECIPE_KEYS)}


def flags(parser):
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_is_recipe_or_run_only(script):
    module, _, _, derived = PARSERS[script]
    dests = set(flags(module.get_args_parser()))
    recipe, run_only = set(module.RECIPE_KEYS), set(module.RUN_ONLY_KEYS)
    assert not recipe & run_only, f"both recipe and run-only: {sorted(recipe & run_only)}"
    where = f"arguments/{module.__name__.rpartition('.')[2]}.py"
    assert dests - recipe - run_only == set(), f"classify in {where}'s RECIPE_KEYS or RUN_ONLY_KEYS"
    assert (recipe | run_only) - dests - set(derived) == set(), "classified keys that are no flag"
    assert len(module.RECIPE_KEYS) == len(recipe) and len(module.RUN_ONLY_KEYS) == len(run_only), "listed twice"


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_the_fuzz_table_covers_every_flag(script):
    module, table, not_fuzzed, _ = PARSERS[script]
    options = {a.option_strings[0] for a in module.get_args_parser()._actions if a.option_strings} - {"-h"}
    options |= {o for a in module.get_args_parser()._actions for o in a.option_strings if o.startswith("--no-")}
    missing = options - set(table) - not_fuzzed
    assert not missing, f"add to tests/faults/test_fuzzed_command_lines.py's table of the {script}: {sorted(missing)}"
    assert not not_fuzzed - options, "a NOT_FUZZED set names a flag the parser no longer has"
