"""The import graph follows docs/architecture.md: no import cycle, no import from a layer above."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tools that run the entry scripts, by design: the demo, and the benchmark (tools/benchmark.py with its shared
# helpers and its data-pipeline sections)
SCRIPTS_DRIVEN_BY = {"tools.demo", "tools.benchmark", "tools.bench_common", "tools.bench_pipeline"}


def layer_table():
    """{top-level name: layer index} from the table in docs/architecture.md ('tests' last)."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        rows = [line for line in f if re.match(r"^\| (\d|tests)", line)]
    layers = {}
    for row in rows:
        index = row.split("|")[1].strip().split()[0]
        for name in re.findall(r"`([a-z_]+)(?:\.py|/\*)`", row.split("|")[2]):
            layers[name] = 99 if index == "tests" else int(index)
    return layers


def our_modules():
    """{dotted module name: path} for every Python file of the project (not .venv, data, results)."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("data", "results", "checkpoints")]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return modules


def imports_of(path, modules, aliases):
    """Our modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in modules and name not in aliases:
                name = name.rpartition(".")[0]
            if name:
                found.add(aliases.get(name, name))
    return found


def graph():
    modules = our_modules()
    # test files import their folder's helpers by bare name (`helpers`, `driver`: pytest puts tests/ on the path)
    aliases = {m.rpartition(".")[2]: m for m in modules if m.startswith("tests.")}
    return {m: imports_of(p, modules, aliases) - {m} for m, p in modules.items()}


def layer_of(module, layers):
    top = module.split(".")[0]
    return 99 if top == "tests" else layers[top]


def test_every_module_has_a_layer_in_the_document():
    layers = layer_table()
    tops = {m.split(".")[0] for m in graph()}
    missing = sorted(tops - set(layers) - {"tests"})
    assert not missing, f"add these to docs/architecture.md's layer table: {missing}"


def test_no_module_imports_from_a_layer_above_it():
    layers = layer_table()
    upward = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
              if layer_of(t, layers) > layer_of(m, layers)
              and not (m in SCRIPTS_DRIVEN_BY and t.startswith("main_"))]
    assert not upward, upward
    assert not [m for m, targets in graph().items() if layer_of(m, layers) < 99
                and any(layer_of(t, layers) == 99 for t in targets)], "a library module or tool imports tests/"


def test_models_and_datasets_do_not_import_each_other():
    crossing = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
                if {m.split(".")[0], t.split(".")[0]} == {"models", "datasets"}]
    assert not crossing, crossing


def test_the_module_graph_has_no_cycle():
    edges = {m: {t for t in ts if not t.startswith("tests.")} for m, ts in graph().items()}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            # a package and its own submodules (models -> models.backbones) are one unit, not a cycle
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_tools_import_library_modules_not_the_entry_scripts():
    scripts = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
               if m.startswith("tools.") and t.startswith("main_") and m not in SCRIPTS_DRIVEN_BY]
    assert not scripts, scripts


SHORT_FUNCTION_FILES = ("main_pretrain.py", "engine_pretrain.py", "main_linear_probe.py", "engine.py",
                        "feature_cache.py", "probe_setup.py")


def test_the_scripts_and_loops_have_no_function_over_100_lines():
    """One readable function a reader holds in one screen (the probe's straight-line probe() with its epoch loop),
    not more."""
    long = []
    for name in SHORT_FUNCTION_FILES:
        with open(os.path.join(ROOT, name)) as f:
            tree = ast.parse(f.read())
        long += [f"{name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 100]
    assert not long, long


def test_the_probe_script_reads_in_a_few_screens():
    """main_linear_probe.py is the parser import, main(), probe() and its few steps (issue 20: <= 350 lines,
    <= 15 top-level definitions), and no function of the probe's path takes more than 6 parameters."""
    with open(os.path.join(ROOT, "main_linear_probe.py")) as f:
        text = f.read()
    definitions = [n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert len(text.splitlines()) <= 350 and len(definitions) <= 15
    wide = []
    for name in ("main_linear_probe.py", "probe_setup.py", "models/heads.py", "arguments/linear_probe.py"):
        with open(os.path.join(ROOT, name)) as f:
            tree = ast.parse(f.read())
        wide += [f"{name}:{n.name}" for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                 and len(n.args.args) + len(n.args.kwonlyargs) > 6]
    assert not wide, wide


# Issue 20: the named types a reader meets following one probe run from the command line to its logged Acc@1 and
# checkpoint: main_linear_probe.py (its module code and every function) and the loop functions its epoch calls
# (docs/architecture.md's walk, steps 1, 2, 4 and 5; the set-up builders of step 3 are read by their result). A type
# is met where its name appears, or where the path reads a field of a variable holding it; PATH_VARIABLES says what
# each such variable holds (None: not ours: argparse's namespace, torch's optimizer, a logger, a dict, a tensor).
PROBE_PATH = {"main_linear_probe.py": None,
              "engine.py": {"train_one_epoch", "evaluate", "epoch_meters", "update_head_meters", "epoch_averages",
                            "mean_losses", "log_head_epoch", "epoch_record"},
              "models/heads.py": {"head_records", "update", "heads_state", "load_heads_state"}}
PATH_VARIABLES = {"run": "Run", "dist_info": "DistInfo", "data": "ProbeData", "model": "ProbeModel",
                  "sources": "Sources", "batches": "BatchSource", "source": "BatchSource", "log": "LoopLog",
                  "meters": "Meters", "head_meters": "Meters", "head": "Head", "h": "Head", "best": "Head",
                  "pick": "Head", "self": "Head",
                  **dict.fromkeys(("args", "ARGS", "optimizer", "group", "g", "logger", "lg", "extra", "found",
                                   "out", "record", "records", "train", "view", "stats", "losses", "stacked", "sums",
                                   "scores", "labels", "state", "exc"))}


def path_scopes():
    """(file, the AST nodes read on the path, the names the file imports) of each file of PROBE_PATH."""
    for name, functions in PROBE_PATH.items():
        with open(os.path.join(ROOT, name)) as f:
            tree = ast.parse(f.read())
        imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        if functions is None:  # the whole script
            yield name, [tree], imported
        else:
            yield name, [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in functions], \
                imported


def test_a_probe_run_meets_at_most_10_named_types():
    """MAE's linear probe needs about 5, DINO's about 4; ours: a handful of records (the run, the process, the
    data, the model, the batch sources, a head), the loops' log settings and meters, and the one-line error."""
    ours = {n.name for _, tree in code_files() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    met, unclassified = set(), set()
    for name, scopes, imported in path_scopes():
        for node in (n for scope in scopes for n in ast.walk(scope)):
            if isinstance(node, ast.Name) and node.id in ours:
                met.add(node.id)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id not in imported:
                if node.value.id not in PATH_VARIABLES:
                    unclassified.add(f"{name}: {node.value.id}.{node.attr}")
                elif PATH_VARIABLES[node.value.id] is not None:
                    met.add(PATH_VARIABLES[node.value.id])
    assert not unclassified, f"say in PATH_VARIABLES what these variables hold: {sorted(unclassified)}"
    assert met <= ours, f"PATH_VARIABLES names types that do not exist: {sorted(met - ours)}"
    assert len(met) <= 10, sorted(met)


# Signatures over 6 parameters that stay, each for a reason: keyword options with defaults of a public constructor
# or entry point, as torch.optim and torch.hub write them (the optimizer's hyper-parameters, load_encoder's).
WIDE_SIGNATURES = {"util/sfadamw.py:__init__", "timecat.py:load_encoder"}


def parameter_count(node):
    """A def's parameters, self and cls aside, *args and **kwargs counted."""
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg) + bool(args.kwarg)


def test_no_library_function_takes_more_than_6_parameters():
    """Issue 20: what belongs together travels as one record (engine.LoopLog, a Head, a BatchSource), not as a
    long list of parameters; tools (command-line programs) aside."""
    wide = []
    for path, tree in code_files():
        if not path.startswith("tools"):
            wide += [f"{path}:{n.name}" for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(n) > 6]
    assert sorted(set(wide) - WIDE_SIGNATURES) == [], "group these parameters into a record"


# the run-folder names of util/layout.py and the log-line formats of util/log_lines.py: written nowhere else
OWNED_NAMES = {"checkpoint.pth.tar": "util/layout.py", "best.pth.tar": "util/layout.py",
               "metrics.jsonl": "util/layout.py", "sweep.log": "util/layout.py", "args.json": "util/layout.py",
               "train.log": "util/layout.py", "checkpoint_epoch": "util/layout.py", "checkpoint_run": "util/layout.py",
               "Selected on validation": "util/log_lines.py", "Top-1 test accuracy": "util/log_lines.py",
               "Training of the supervised": "util/log_lines.py", "============ Starting epoch": "util/log_lines.py",
               "Epoch[": "util/log_lines.py", "Test:\tLoss": "util/log_lines.py", "Test: Loss": "util/log_lines.py",
               "feature_importance: ": "util/log_lines.py"}


def test_run_folder_names_and_log_formats_have_one_owner():
    """No string constant (docstrings and comments aside) of the library, scripts or tools spells a name that
    util/layout.py or util/log_lines.py owns."""
    found = []
    for module, path in our_modules().items():
        if module.startswith("tests"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{rel}: {name}" for name, owner in OWNED_NAMES.items()
                          if rel != owner and (node.value == name or node.value.startswith(name))]
    assert not found, found


def code_files():
    """(relative path, syntax tree) of every project Python file outside tests/."""
    for module, path in our_modules().items():
        if not module.startswith("tests."):
            with open(path) as f:
                yield os.path.relpath(path, ROOT), ast.parse(f.read())


def string_parts(node):
    """The constant text of a string or f-string node, with '{}' where an f-string formats a value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def test_naming_conventions_are_written_only_by_their_owner():
    """A checkpoint milestone folder is built (f"checkpoints_step{...}") or matched (a regex naming
    checkpoints_) only in util/layout.py; the CIFAR weight-decay grid is written only in util/sweeps.py."""
    cifar_grid = ("1e-2", "5e-2", "1e-4", "5e-4", "1e-3", "5e-3")
    found = []
    for path, tree in code_files():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and "checkpoints_step{}" in string_parts(node) \
                    and path != os.path.join("util", "layout.py"):
                found.append(f"{path}:{node.lineno} builds a milestone folder name")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and getattr(node.func.value, "id", None) == "re" and node.args \
                    and "checkpoints_" in (string_parts(node.args[0]) or "") \
                    and path != os.path.join("util", "layout.py"):
                found.append(f"{path}:{node.lineno} matches milestone folders with its own regex")
            texts = [string_parts(e) for e in node.elts] if isinstance(node, (ast.Tuple, ast.List)) else []
            text = string_parts(node) or ""
            if (tuple(texts[:6]) == cifar_grid or " ".join(cifar_grid) in text) \
                    and path != os.path.join("util", "sweeps.py"):
                found.append(f"{path}:{node.lineno} writes the CIFAR weight-decay grid")
    assert not found, found


def test_long_options_are_spelled_with_underscores():
    """Every long option's main name uses underscores (the original's spelling); a hyphenated spelling is only
    ever an alias after it (tools/download.py --keep-archive, tools/summarize.py --no-save). The one exception is
    util/flags.py's hidden negation of every boolean flag, --no-{name}, argparse's BooleanOptionalAction spelling."""
    hyphenated = []
    for path, tree in code_files():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
                first = string_parts(node.args[0]) or ""
                negation = path == os.path.join("util", "flags.py") and first == "--no-{}"
                if first.startswith("--") and "-" in first[2:] and not negation:
                    hyphenated.append(f"{path}:{node.lineno} {first}")
    assert not hyphenated, hyphenated


# what the tests and tools may use of an entry script: what a user runs (main) and its command line
SCRIPT_API = {"main", "get_args_parser"}


def script_uses(tree, scripts):
    """(line, name) of every attribute of an entry script a file reads or patches beyond SCRIPT_API: `x.name` where x
    is bound to the script by an import of the innermost scope that binds x, `from main_x import name`, and
    `setattr(x, "name", ...)` (monkeypatch.setattr too)."""
    found = []

    def bindings(body):
        """{local name: module} of the imports in one scope's own statements (nested functions have theirs)."""
        bound = {}
        for stmt in body:
            for node in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else ():
                if isinstance(node, ast.Import):
                    bound.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names})
                elif isinstance(node, ast.ImportFrom):
                    bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
                    if node.module in scripts:
                        found.extend((node.lineno, a.name) for a in node.names if a.name not in SCRIPT_API)
        return bound

    def visit(node, scopes):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scopes = scopes + [bindings(node.body)]
        target = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target, attr = node.value.id, node.attr
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setattr" \
                and len(node.args) > 1 and isinstance(node.args[0], ast.Name) \
                and isinstance(node.args[1], ast.Constant):
            target, attr = node.args[0].id, node.args[1].value
        if target is not None and attr not in SCRIPT_API:
            module = next((scope[target] for scope in reversed(scopes) if target in scope), None)
            if module in scripts:
                found.append((node.lineno, attr))
        for child in ast.iter_child_nodes(node):
            visit(child, scopes)

    visit(tree, [bindings(tree.body)])
    return found


def test_tests_and_tools_use_only_the_scripts_main_and_parser():
    """Issue 20: tests and tools call the library module that owns a name (arguments/, engine.py, probe_setup.py,
    util/...), never a script's internals: an entry script keeps no import or re-export only for them."""
    scripts = {m for m in our_modules() if m.startswith("main_")}
    found = []
    for module, path in our_modules().items():
        if module.startswith(("tests", "tools")):
            with open(path) as f:
                found += [f"{os.path.relpath(path, ROOT)}:{line} uses {name}"
                          for line, name in script_uses(ast.parse(f.read()), scripts)]
    assert not found, found
