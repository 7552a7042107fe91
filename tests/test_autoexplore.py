"""AutoExplore: the sandbox holds against escapes and odd files, tasks are deterministic and solvable,
costs and termination, leave-out, and a tiny end-to-end run on a repository built here."""
import builtins
import json
import os
import random
import subprocess
import sys

import pytest

import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_repo(base):
    """A small repository with targets at depths 0 to 3 and every kind of task."""
    repo = os.path.join(base, "demo")
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        write(os.path.join(repo, f"{name}.py"),
              f'"""Helpers for the {name} stage of the demo pipeline."""\n\n\n'
              f'def compute_{name}(x):\n    """Return the {name} score of a sample."""\n    return x + {i}\n\n\n'
              f'class {name.title()}Runner:\n    """Runs every {name} job in the queue."""\n')
    for i, name in enumerate(["io", "net", "cache"]):
        write(os.path.join(repo, "pkg", f"{name}.py"),
              f'"""The {name} layer of the package lives here."""\n\n\ndef open_{name}(path):\n'
              f'    """Open a {name} handle for the given path."""\n    return path\n')
    write(os.path.join(repo, "pkg", "sub", "parse.py"), 'def parse_header(line):\n    """Split a header line into its name and value."""\n    return line.split(":")\n')
    write(os.path.join(repo, "pkg", "sub", "emit.py"), "class Emitter:\n    pass\n")
    write(os.path.join(repo, "pkg", "sub", "deep", "core.py"), "def deep_core_value():\n    return 42\n")
    write(os.path.join(repo, "README.md"), "# Demo project\n\n## Getting started quickly\n\nRun it.\n")
    write(os.path.join(repo, "data", "prices.csv"), "item,price,currency\napple,1,EUR\n")
    return repo


@pytest.fixture
def repo(tmp_path):
    return make_repo(str(tmp_path))


def env_for(repo, **kw):
    options = ",".join([f"repos={repo}"] + [f"{k}={v}" for k, v in kw.items()])
    return envs.make_env("autoexplore", "depth1", options=options)


def task(repo, question="Which file?", targets=("alpha.py",), split="test"):
    return {"repo": os.path.realpath(repo), "question": question, "targets": list(targets), "kind": "user",
            "evidence": "", "split": split}


def test_sandbox_escapes_and_odd_files(tmp_path, repo, monkeypatch):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("TOP SECRET")
    os.symlink(outside / "key.txt", os.path.join(repo, "link_to_file.txt"))
    os.symlink(outside, os.path.join(repo, "link_to_dir"))
    os.symlink(os.path.join(repo, "loop"), os.path.join(repo, "loop"))  # a symlink to itself
    os.symlink("/etc/passwd", os.path.join(repo, "pkg", "abs_link"))
    os.symlink(os.path.join(repo, "alpha.py"), os.path.join(repo, "inner_link.py"))  # stays inside: allowed
    with open(os.path.join(repo, "blob.bin"), "wb") as f:
        f.write(b"\x00\x01\x02" * 100)
    with open(os.path.join(repo, "huge.txt"), "w") as f:
        f.write("x = 1\n" * 400_000)  # 2.4 MB, more than READ_BYTES
    write(os.path.join(repo, "locked.py"), "hidden = True\n")
    for odd in ["my file.py", "new\nline.py", "café.py", 'quote".py']:
        write(os.path.join(repo, odd), f"# {odd!r}\n")
    os.mkfifo(os.path.join(repo, "pipe"))  # reading it would block: never listed

    real_open = builtins.open
    opened = []

    def spy_open(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        if str(path).endswith("locked.py"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", spy_open)

    env = env_for(repo)
    env.reset(task(repo), seed=0)
    names = " ".join(env.actions)
    for hidden in ["link_to_file", "link_to_dir", "loop", "pipe"]:
        assert hidden not in names, hidden
    assert "cd .." not in env.actions  # nothing above the root
    assert "cat inner_link.py" in env.actions
    assert 'cat "my file.py"' in env.actions and 'cat "new\\nline.py"' in env.actions
    assert 'cat "caf\\u00e9.py"' in env.actions and "\n" not in "".join(env.actions)

    def do(action):
        return env.step(env.actions.index(action))

    reward, done, _ = do("cat blob.bin")
    assert reward == -1.5 and not done and env.result.startswith("warning: binary file")
    reward, _, _ = do("cat locked.py")
    assert reward == -2 and env.result.startswith("error: cannot read")
    do("cat huge.txt")
    assert "more lines not shown" in env.result and len(env.result) < 1000
    do('cat "new\\nline.py"')
    assert "new\\nline.py" in env.result
    do("cd pkg")
    assert "abs_link" not in " ".join(env.actions)
    # random walks: whatever the agent chooses, every file opened lies inside the repository
    root = os.path.realpath(repo)
    for seed in range(30):
        env.reset(task(repo), seed=seed)
        rng = random.Random(seed)
        while not env.done:
            env.step(rng.randrange(len(env.actions)))
    assert opened and all(p == root or p.startswith(root + os.sep) for p in opened), \
        [p for p in opened if not p.startswith(root)]


def test_task_file_refuses_paths_outside(tmp_path, repo):
    for target in ["/etc/passwd", "../secret.txt", "pkg/../../x.py", "missing.py", "pkg"]:
        path = tmp_path / "tasks.json"
        path.write_text(json.dumps([{"repo": repo, "question": "q?", "targets": [target]}]))
        with pytest.raises(ValueError, match="not a file the agent can reach"):
            envs.read_task_file(str(path))
    path.write_text(json.dumps([{"repo": str(tmp_path / "nope"), "question": "q?", "target": "a.py"}]))
    with pytest.raises(ValueError, match="does not exist"):
        envs.read_task_file(str(path))
    path.write_text(json.dumps([{"repo": repo, "question": "Where is the io layer?", "target": "pkg/io.py"}]))
    assert envs.read_task_file(str(path))[0]["targets"] == ["pkg/io.py"]
    with pytest.raises(ValueError, match="repository path does not exist"):
        envs.make_env("autoexplore", options=f"repos={tmp_path / 'nope'}")


def test_tasks_deterministic_and_solved_by_the_oracle(repo):
    first = envs.repo_tasks(os.path.realpath(repo), 400)
    assert first == envs.repo_tasks(os.path.realpath(repo), 400)
    assert {t["kind"] for t in first} >= {"function", "class", "docstring", "module", "heading", "table"}
    assert {envs.level(t) for t in first} == {0, 1, 2}
    for t in first:
        assert t["evidence"] and all(os.path.isfile(os.path.join(repo, p)) for p in t["targets"])
    for stage in envs.AutoExplore.stages:
        env = envs.make_env("autoexplore", stage, options=f"repos={repo}")
        tasks = [t for split in envs.SPLITS for t in env.tasks(split)]
        for t in tasks:
            env.reset(t, seed=0)
            steps = 0
            while not env.done:
                _, _, info = env.step(env.oracle())
                steps += 1
            assert info["success"] and steps == envs.target_depth(t) + 2 <= env.horizon, t


def test_costs_and_termination(repo):
    env = env_for(repo)
    env.reset(task(repo, targets=["pkg/io.py"]), seed=0)
    assert env.distance() == 3
    assert env.step(env.actions.index("cd pkg")) == (-1, False, {"success": False, "dangerous": False})
    assert env.step(env.actions.index("cat io.py"))[0] == -1
    assert "cat io.py" not in env.actions and "id io.py" in env.actions  # each file is read once
    reward, done, info = env.step(env.actions.index("id io.py"))
    assert (reward, done, info["success"]) == (-1 + 15, True, True)
    with pytest.raises(RuntimeError):
        env.step(0)
    env.reset(task(repo, targets=["pkg/io.py"]), seed=0)
    env.step(env.actions.index("cat alpha.py"))
    reward, done, info = env.step(env.actions.index("id alpha.py"))
    assert (reward, done, info["success"]) == (-1 - 15, True, False)
    short = envs.make_env("autoexplore", "depth1", horizon=2, options=f"repos={repo}")
    short.reset(task(repo, targets=["pkg/io.py"]), seed=0)
    short.step(short.actions.index("cd pkg"))
    reward, done, info = short.step(short.actions.index("cd sub"))
    assert (reward, done, info["success"]) == (-1, True, False)  # out of time


def test_menu_puts_the_unnamed_moves_first(repo):
    # "identify that file" is label 0 wherever a file was read here; reading down the list is the
    # first `cat`, right after it; then `cd ..`, the folders, the other unread files, the older reads
    env = env_for(repo)
    env.reset(task(repo, targets=["pkg/io.py"]), seed=0)
    assert env.actions[:3] == ["cat README.md", "cd data", "cd pkg"]
    env.step(env.actions.index("cat beta.py"))
    env.step(env.actions.index("cat README.md"))
    assert env.actions == ["id README.md", "cat alpha.py", "cd data", "cd pkg", "cat delta.py", "cat gamma.py",
                           "id beta.py"]
    # the observation lists what is left to try, then what was done here (the history shows only 4)
    assert "Here: data/ pkg/ alpha.py delta.py gamma.py\nDone here: README.md beta.py\n" in env.observation
    env.step(env.actions.index("cd pkg"))
    assert env.actions[:2] == ["cat cache.py", "cd .."]
    env.step(env.actions.index("cd .."))
    assert "Here: data/ alpha.py delta.py gamma.py\nDone here: pkg/ README.md beta.py\n" in env.observation
    env.step(env.actions.index("cd pkg"))
    env.step(0)
    assert env.actions[:3] == ["id cache.py", "cat io.py", "cd .."]


def test_scripted_reference_reads_the_question_not_the_targets(repo):
    root = os.path.realpath(repo)
    for t in envs.repo_tasks(root, 400):  # its evidence shows in what `cat` prints of every target
        for target in t["targets"]:
            *rel, name = target.split("/")
            view = envs.view(envs.read_text(root, tuple(rel), name)[0], 400)
            assert all(e in view for e in envs.question_evidence(t["question"])), t

    def episode(targets, question="Which file defines the function open_net?"):
        env = env_for(repo)
        env.reset(task(repo, question, targets), seed=0)
        moves = []
        while not env.done:
            moves.append(env.actions[env.scripted()])
            _, _, info = env.step(env.actions.index(moves[-1]))
        return moves, info["success"]
    # no name here shares a word with the question: the files first, then the folders in menu order;
    # in pkg/, "net" picks net.py, whose `def open_net(` it then recognises
    walk = ["cat README.md", "cat alpha.py", "cat beta.py", "cat delta.py", "cat gamma.py", "cd data",
            "cat prices.csv", "cd ..", "cd pkg", "cat net.py", "id net.py"]
    assert episode(["pkg/net.py"]) == (walk, True)
    assert episode(["alpha.py"]) == (walk, False)  # the targets play no part
    moves, won = episode(["gamma.py"], "Which file defines the class GammaRunner?")
    assert moves == ["cat gamma.py", "id gamma.py"] and won
    moves, won = episode(["pkg/net.py"], "Which file defines the function open_nowhere?")  # nothing answers
    assert not won and "id" not in " ".join(moves) and len(moves) == 15


def test_split_by_repository_name(tmp_path):
    # a repository's split follows from its name alone: another repository more or less never moves
    # it (names chosen so that the six, and the last five, cover the three splits)
    roots = []
    for i in range(6):
        roots.append(str(tmp_path / f"repo{i}"))
        os.rename(make_repo(str(tmp_path / f"base{i}")), roots[-1])

    def splits(chosen):
        tasks = envs.load_tasks(tuple(os.path.realpath(r) for r in chosen), "", 400)
        return {os.path.basename(t["repo"]): t["split"] for t in tasks}

    every = splits(roots)
    assert every == {f"repo{i}": envs.repo_split(f"repo{i}") for i in range(6)}
    assert set(every.values()) == set(envs.SPLITS)
    fewer = splits(roots[1:])
    assert fewer == {name: split for name, split in every.items() if name != "repo0"}


def test_leave_out_never_hides_a_target(repo):
    env = env_for(repo, leave_out=0.9)
    t = task(repo, targets=["pkg/sub/parse.py"], split="train")
    env.reset(dict(t, split="test"), seed=0)
    full = len(env.actions)
    hidden = 0
    for seed in range(40):
        env.reset(t, seed=seed)
        hidden += len(env.actions) < full
        while not env.done:
            env.step(env.oracle())
        assert env.result == "correct"
    assert hidden > 30
    for seed in range(10):
        env.reset(dict(t, split="test"), seed=seed)
        assert len(env.actions) == full  # never at test time


def test_teacher_reads_down_the_list(repo):
    # in the target's folder a detour is a read of the first unread file, and the teacher reads on
    # while the target is not next and time allows; the recovery, reading the target, is a policy target
    import data_gen

    def episode(horizon):
        env = envs.make_env("autoexplore", "depth1", horizon=horizon, options=f"repos={repo}")
        records = data_gen.teacher_episode(env, task(repo, targets=["delta.py"]), 0, random.Random(0), 1.0, False)
        history = [r["prompt"].split("History: ")[1].split("\n")[0] for r in records["reflection"]]
        assert records["reflection"][-1]["completion"].endswith("Next: identify that file.")
        return history, records["policy"][0]

    history, recovery = episode(15)
    assert history[-1].endswith("cat delta.py")  # detours at every step, yet none once the answer is read
    assert history[:4] == ["(none)", "cat README.md", "cat README.md; cat alpha.py",
                           "cat README.md; cat alpha.py; cat beta.py"]
    assert recovery["negative"] and recovery["completion"] == "1"  # the first unread file, after `id` of the last read
    assert "\nid beta.py (0)\ncat delta.py (1)\ncd data (2)\n" in recovery["prompt"]
    history, recovery = episode(4)  # time for two wrong files only: the recovery skips beta.py
    assert history[:3] == ["(none)", "cat README.md", "cat README.md; cat alpha.py"]
    assert recovery["completion"] == "4" and "\ncat beta.py (1)\ncd data (2)\ncd pkg (3)\ncat delta.py (4)\n" in recovery["prompt"]


def test_search_teacher_follows_what_the_prompt_shows(repo):
    # explore_teacher=search: the scripted search leads, its analysis says why and names the command,
    # its read of a wrong file is the negative example, and a failed episode is left out
    import data_gen
    env = envs.make_env("autoexplore", "depth1", options=f"repos={repo}")
    records = data_gen.teacher_episode(env, task(repo, "Which file defines the function open_net?", ["pkg/net.py"]),
                                       0, random.Random(0), 1.0, False, search=True)
    said = [r["completion"] for r in records["reflection"]]
    assert said[0] == "No name here matches the task. Next: cat README.md."
    assert said[1] == 'README.md does not show "def open_net(". No name here matches the task. Next: cat alpha.py.'
    assert 'The task says "net": net.py matches. Next: cat net.py.' in said
    assert said[-1] == 'net.py shows "def open_net(": it answers the task. Next: id net.py.'
    assert [r["negative"] for r in records["policy"]] == [s.split(" does not show ")[0] != s for s in said]
    for r in records["policy"]:
        labels, actions = envs.parse_menu(r["prompt"])
        assert r["prompt"].split(" # Analyze:\n")[1].split("\n")[0].endswith(f"Next: {actions[labels.index(r['completion'])]}.")
    failed = task(repo, "Which file defines the function open_net?", ["alpha.py"])  # the search never ids alpha.py
    assert data_gen.teacher_episode(env, failed, 0, random.Random(0), 1.0, False, search=True) is None
    missed = task(repo, "Which file defines the function open_net?", ["pkg/net.py"])
    assert data_gen.teacher_episode(env, missed, 0, random.Random(0), 0.0, False, search=True) is None  # _pos
    with pytest.raises(ValueError, match="explore_teacher=search"):
        data_gen.generate("autoexplore", "unused", 1, 1, 0.3, 0, explore_teacher="search")


def test_installed_repositories():
    roots = envs.installed_repos()
    names = {os.path.basename(r) for r in roots}
    assert "tqdm" in names and "torch" not in names and "transformers" not in names
    assert all(os.path.isdir(r) for r in roots)


def test_tiny_end_to_end(tmp_path, repo):
    data, out = tmp_path / "data" / "autoexplore", tmp_path / "out"  # data_gen's default folder, in tmp_path
    env_args = ["--env=autoexplore", f"--env_options=repos={repo}"]
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=600", "--batch_size=8", "--eval_interval=2",
            "--eval_batches=1", "--device=cpu", "--max_iters=2", "--block_size=1024"]

    def run(script, *args):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    run("data_gen.py", *env_args, "--episodes=6", "--val_episodes=2")
    records = [json.loads(line) for line in open(data / "policy_train.jsonl")]
    assert records and all(r["prompt"].startswith("Task: ") for r in records)
    run("sft.py", "--env=autoexplore", f"--data_dir={data}", f"--out_dir={out}", *tiny)
    run("rl.py", *env_args, f"--out_dir={out}", "--stage=depth1", "--total_iters=1", "--num_envs=2",
        "--minibatch_size=4", "--reflection_max_tokens=8", "--device=cpu")
    stdout = run("eval.py", *env_args, f"--out_dir={out}", "--episodes=2", "--stages=depth1",
                 "--reflection_max_tokens=8", f"--methods=Reflect-RL={out}/rl+{out}/sft_reflection")
    assert "Reflect-RL" in stdout and "Scripted" in stdout and "Oracle" in stdout
    stdout = run("eval.py", "--env=autoexplore", f"--out_dir={out}", "--check", "--episodes=4",
                 "--reflection_max_tokens=8", f"--methods=Reflect-RL={out}/rl+{out}/sft_reflection")
    assert "| depth1 | 4 | (all) |" in stdout
