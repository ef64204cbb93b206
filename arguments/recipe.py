"""The recipe record of a run: the values that define its weight trajectory, as one frozen dataclass per script
(arguments/linear_probe.py ProbeRecipe, arguments/pretrain.py PretrainRecipe) built once from the parsed and
resolved flags. Its fields are the recipe keys: the recipe check of a resumed or evaluated run, the probe's
folder-name hash and the RECIPE_KEYS that tests/faults/test_flag_classes.py classifies all derive from them, so
adding a recipe value is one field (with its legacy value if old runs lack it). Imports nothing heavy."""
import dataclasses

from util.cli import UserError

NO_LEGACY = object()  # a key every saved run has


def recipe_key(legacy=NO_LEGACY, derived=False, training_only=False, compare=True):
    """A field of a recipe record. legacy: the value the key had in runs written before it existed (read in their
    place; the probe also leaves a key at that value out of its folder hash, so no old folder moves); derived: set
    from other flags, not a flag itself; training_only: --mode eval_only may differ in it; compare=False: a value
    compared only where the record's compared_keys says so."""
    return dataclasses.field(default=None, compare=compare, metadata={
        "legacy": legacy, "derived": derived, "training_only": training_only})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Base of the scripts' records; a subclass declares the fields with recipe_key()."""

    hint = "another --dump_path"  # what check's error suggests instead; unannotated: a class attribute, not a key

    @classmethod
    def keys(cls):
        """The keys compared on every resume, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.compare)

    @classmethod
    def keys_where(cls, what):
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata[what])

    @classmethod
    def legacy_values(cls):
        return {f.name: f.metadata["legacy"] for f in dataclasses.fields(cls) if f.metadata["legacy"] is not NO_LEGACY}

    @classmethod
    def of(cls, values):
        """The record of a mapping: vars(args) of this run, or the args dict a saved run stored (args.json, a
        checkpoint's "args"); a key an older run lacks takes its legacy value, old names their canonical one."""
        legacy = cls.legacy_values()
        return cls(**cls.canonical({f.name: values.get(f.name, legacy.get(f.name)) for f in dataclasses.fields(cls)},
                                   values))

    @classmethod
    def canonical(cls, fields, values):
        """Hook: old spellings of values in a saved run (values: all it stored) -> today's."""
        return fields

    def compared_keys(self):
        return self.keys()

    def check(self, saved_args, path, skip=()):
        """Refuse to resume (or evaluate) a run whose saved arguments have another recipe: one line naming the first
        key that differs. skip: keys not compared (e.g. the training-only ones for --mode eval_only)."""
        saved = self.of(saved_args)
        changed = [k for k in self.compared_keys() if k not in skip and getattr(saved, k) != getattr(self, k)]
        if changed:
            k = changed[0]
            raise UserError(f"{path} was written by a run with --{k} {getattr(saved, k)} (now {getattr(self, k)}); "
                            f"use {self.hint}, or --start_over to overwrite it")
