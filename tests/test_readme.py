"""The README shows only options that exist.

Every `--key` on a command that runs `python X.py` or `torchrun ... X.py`, in the README's code
(fenced blocks and inline spans), must be one of X.py's options: the lower-case module-level
defaults above its `config_keys` (the block that `--help` prints), with a value of the default's
type. Every `key=value` inside `--env_options=` must be one of the environment's own options
(`options` on its class in envs.py). The scripts are read with `ast`: nothing is imported, nothing
trains, so the test takes well under a second.
"""
import ast
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")", ">", ">>", "<", "<<", ">&", "<&"}
# data_gen.py wants --key=value for every option; sft.py, rl.py and eval.py read a bare --flag as
# True (so a bare flag must be a boolean option there); bench.py has no boolean options
VALUE_REQUIRED = {"data_gen.py"}


def help_block(source: str) -> str:
    """The config block that a script's --help prints: the text after its first `# ----` line, up to
    the next one (bench.py has none: its block runs on, past the CONFIGS table, to the argument loop)."""
    parts = re.split(r"^# -{20,}.*$", source, flags=re.M)
    return parts[1] if len(parts) > 1 else ""


def script_options(path: str) -> dict:
    """{key: default} of a script, read with ast: the module-level assignments of a literal bool,
    int, float or str to a lower-case name, before `config_keys` (or before the first statement that
    is neither an import nor an assignment, where a script has no config_keys: bench.py)."""
    options = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            break
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if "config_keys" in names:
            break
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError):
            continue
        for name in names:
            if name.islower() and not name.startswith("_") and isinstance(value, (bool, int, float, str)):
                options[name] = value
    return options


def env_options() -> dict:
    """{env name: set of make_env option keys}, from `ENVS = {...}` and each class's `options = {...}`."""
    tree = ast.parse(open(os.path.join(ROOT, "envs.py")).read())
    by_class, envs = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "options"
                                                         for t in item.targets)
                        and isinstance(item.value, ast.Dict)):
                    by_class[node.name] = {ast.literal_eval(k) for k in item.value.keys}
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ENVS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            envs = {ast.literal_eval(k): v.id for k, v in zip(node.value.keys, node.value.values)}
    return {name: by_class.get(cls, set()) for name, cls in envs.items()}


def commands(markdown: str) -> list[str]:
    """Shell lines from the code of a Markdown text (fenced blocks and inline spans), continuation
    lines joined."""
    fence = r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```"  # fenced blocks, indented ones (in a list) too
    code = re.findall(fence, markdown, flags=re.M | re.S)
    prose = re.sub(fence, "", markdown, flags=re.M | re.S)
    code += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    lines = []
    for block in code:
        lines += block.replace("\\\n", " ").split("\n")
    return lines


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: good enough to split on spaces, without the comment
        return line.split("#")[0].split()


def calls(line: str):
    """(script, [its arguments]) for each `python X.py ...` or `torchrun ... X.py ...` in a line."""
    words = tokens(line)
    for i, word in enumerate(words):
        j = None
        if re.fullmatch(r"(\S*/)?python[0-9.]*", word) and i + 1 < len(words) and words[i + 1].endswith(".py"):
            j = i + 1
        elif re.fullmatch(r"(\S*/)?torchrun", word):
            j = next((k for k in range(i + 1, len(words)) if words[k].endswith(".py")), None)
        if j is not None:
            args = []
            for arg in words[j + 1:]:
                if arg in SEPARATORS:
                    break
                args.append(arg)
            yield words[j], args


def fits(value: str, default) -> bool:
    """Whether a script's parser would take `value` for an option with this default."""
    if "$" in value:  # a shell variable: known only when it runs
        return True
    if isinstance(default, bool):
        return value.lower() in ("true", "false", "1", "0")
    try:
        type(default)(value)
    except ValueError:
        return False
    return True


def problems(markdown: str, root: str = ROOT) -> list[str]:
    """Every option in the Markdown's commands that a script or an environment does not have."""
    found, known_envs = [], env_options()
    for line in commands(markdown):
        for script, args in calls(line):
            path = os.path.join(root, script)
            if os.path.dirname(script) or not os.path.isfile(path):
                found.append(f"{script}: not a script at the top of the repository ({line.strip()})")
                continue
            options = script_options(path)
            env = next((a.partition("=")[2] for a in args if a.startswith("--env=")), options.get("env", ""))
            for arg in args:
                if not arg.startswith("--") or arg == "--help":
                    continue
                key, eq, value = arg[2:].partition("=")
                if key not in options:
                    found.append(f"{script} has no option --{key} ({line.strip()})")
                elif not eq and (not isinstance(options[key], bool) or script in VALUE_REQUIRED):
                    found.append(f"{script} --{key} needs a value, --{key}=... ({line.strip()})")
                elif eq and not fits(value, options[key]):
                    found.append(f"{script} --{key} wants a value of type {type(options[key]).__name__}, "
                                 f"got {value!r} ({line.strip()})")
                elif key == "env_options" and "$" not in env:
                    for item in filter(None, value.split(",")):
                        name = item.partition("=")[0]
                        if "=" not in item or name not in known_envs.get(env, set()):
                            found.append(f"{script} --env_options: {env!r} has no option {name!r} "
                                         f"(it has: {', '.join(sorted(known_envs.get(env, ()))) or 'none'})")
    return found


def test_readme_commands_use_real_options():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(list(c for line in commands(readme) for c in calls(line))) >= 10  # the parse found the commands
    assert problems(readme) == []


def test_the_check_catches_wrong_options():
    good = """
```
python sft.py --role=policy --init_from=gpt2-xl --lora_r=16 --device=cuda   # a comment with --nothing
python rl.py --curriculum --resume && python eval.py --env=autoexplore --episodes=128
python data_gen.py --env=autoexplore --env_options=repos=/src/a:/src/b,leave_out=0.3
torchrun --nproc_per_node=4 sft.py --env=household
python3 -m pytest -q tests
```
and inline `python eval.py --plot`.
"""
    assert problems(good) == []
    wrong = {  # each line holds one mistake
        "python sft.py --no_such_option=1": "no option --no_such_option",
        "python sft.py --env=autoexplore --max_iters=12 \\\n  --learning_rat=1e-3": "no option --learning_rat",
        "torchrun --nproc_per_node=2 sft.py --lr=1e-3": "no option --lr",
        "python rl.py --curriculum && python eval.py --episode=5": "no option --episode",
        "python eval.py --episodes=many": "of type int",
        "python rl.py --curriculum=maybe": "of type bool",
        "python data_gen.py --shuffle_labels": "needs a value",
        "python sft.py --env_options=repos=/a": "no option --env_options",
        "python data_gen.py --env=autoexplore --env_options=repo=/a": "has no option 'repo'",
        "python rl.py --env_options=leave_out=0.3": "'taxi' has no option 'leave_out'",
        "python train.py --env=taxi": "not a script",
    }
    for line, message in wrong.items():
        found = problems(f"```\n{line}\n```\n")
        assert len(found) == 1 and message in found[0], (line, found)
    assert problems("Run `python eval.py --plot`, then `python bench.py --configs=xl\n--devices=cuda`.") != []


def test_options_are_what_help_prints():
    """The options read here are the `name = value` lines of the block each script's --help prints."""
    for script in ("sft.py", "rl.py", "eval.py", "data_gen.py", "bench.py"):
        source = open(os.path.join(ROOT, script)).read()
        printed = set(re.findall(r"^([a-z][a-z0-9_]*) = ", help_block(source), flags=re.M))
        assert printed and set(script_options(os.path.join(ROOT, script))) == printed, script
    assert {"repos", "tasks", "leave_out"} <= env_options()["autoexplore"]


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python3 -m pytest -q tests" in commands(readme)
    assert re.search(r"^python3 -m pytest -q tests$", ci, flags=re.M)
