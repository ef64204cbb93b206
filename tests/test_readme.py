"""The README's examples of the encoders from Python run as written and print what the README shows: its Python
snippet and torch.hub line on generated ResNet50 checkpoints in the cat2 tag's place, and its mixed-architecture
refusal line (the README's outputs come from docs/guide.md's "The README's example outputs")."""
import os
import shlex

from PIL import Image

from helpers import ROOT, make_checkpoint, run_script

SECTION = "## The encoders from Python"


def readme_section():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    text = text[text.index(SECTION):]
    return text[:text.index("\n## ", 1)]


def blocks(text, lang=""):
    """The fenced blocks of a language ('' = plain output blocks), in order."""
    found, current, inside = [], None, False
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                if current is not None:
                    found.append("\n".join(current))
                current, inside = None, False
            else:
                current, inside = ([] if line[3:].strip() == lang else None), True
        elif current is not None:
            current.append(line)
    return found


def run_python(code, cwd, env):
    done = run_script(["-c", code], cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_python_and_hub_examples_print_what_the_readme_shows(tmp_path):
    released = tmp_path / "checkpoints" / "supervised_pretrain" / "resnet50_sfadamw" / "checkpoints_step200"
    for i in range(2):
        make_checkpoint(str(released / f"checkpoint_run{i}.pth.tar"), "resnet50", seed=i)
    Image.new("RGB", (500, 375), (150, 90, 40)).save(tmp_path / "dog.jpg")
    env = {"TIMECAT_CHECKPOINTS": str(tmp_path / "checkpoints")}  # run_script adds os.environ and OMP_NUM_THREADS
    section = readme_section()
    snippet, hub = blocks(section, "python")[:2]
    assert run_python(snippet, tmp_path, env).strip() == blocks(section)[0].strip()
    # the hub line's comment is its output
    expected = hub.strip().splitlines()[-1].split("# ", 1)[1].strip()
    assert run_python(hub.replace("path/to/time-cat", ROOT), tmp_path, env).strip() == expected


def test_the_mixed_transform_refusal_is_the_readmes_line(tmp_path):
    for seed, arch in enumerate(("resnet18", "convnext_tiny")):
        make_checkpoint(str(tmp_path / "mixed" / f"{arch}.pth"), arch, seed=seed)
    shown = next(b for b in blocks(readme_section()) if "error:" in b)
    command, error = shown.split("\nerror: ")
    argv = shlex.split(command.replace("\\\n", " ").lstrip("$ "))
    assert argv[:2] == ["python", "main_linear_probe.py"]
    done = run_script([os.path.join(ROOT, argv[1]), *argv[2:]], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "error: " + error.strip(), done.stderr
