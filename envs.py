"""
Text environments for Reflect-RL agents, their oracles, task splits, curriculum stages, and the
prompt format. This is the only module the stage files share.

Every environment has the same small interface:
    env.reset(task, seed) -> observation text (also kept in env.observation)
    env.actions           -> admissible actions, strings in display order
    env.step(i)           -> (reward, done, info); info has "success" and "dangerous"
    env.oracle()          -> index of a best action now, from privileged state; used by data_gen.py
                             and the tests, never by the agent
    env.tasks(split)      -> the start tasks of "train", "val" or "test" for the env's stage
    env.state             -> a JSON-able summary of where the episode is (data_gen.py records it)
and class attributes: name, stages (the curriculum, in order), default_horizon, context (tokens the
scratch model's context needs), reward_scale (rl.py trains on reward * reward_scale) and options
(the "key=value" settings make_env accepts, with their types).
"""
import ast
import glob
import hashlib
import json
import os
import random
import re
import warnings
from functools import lru_cache

# ----------------------------------------------------------------------------------------------
# The prompt (single-prompt action enumeration): one prompt lists every action with a label and the
# policy answers with the label alone. Each label is one character, one token in GPT-2's tokenizer.

LABELS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
MENU_HEAD, ACTION_HEAD = "# Choose from below your action:\n", " # Action:\n"


def analyze_prompt(obs: str) -> str:
    """What the reflection model sees; it continues with its analysis."""
    return obs + "\n # Analyze:\n"


def policy_prompt(obs: str, actions: list[str], reflection: str | None = None, labels=LABELS) -> str:
    """What the policy sees; label i belongs to action i (callers may pass labels permuted). Each menu
    line puts its label after the action, "move south (0)": the position where the policy reads a
    line's label has already seen the action, so finding the command an analysis names and answering
    with its label is one look-up (SmolLM2 learns it in 90 SFT iterations after the action, none
    with the label first: docs/pretrained.md E6)."""
    if len(actions) > len(labels):
        raise ValueError(f"{len(actions)} actions but only {len(labels)} labels")
    head = obs + "\n" if reflection is None else analyze_prompt(obs) + reflection + "\n"
    menu = "".join(f"{a} ({labels[i]})\n" for i, a in enumerate(actions))
    return head + MENU_HEAD + menu + ACTION_HEAD


def parse_menu(prompt: str) -> tuple[list[str], list[str]]:
    """The labels and actions of a policy prompt's menu, in its order: policy_prompt's inverse."""
    menu = prompt.rpartition(MENU_HEAD)[2].rpartition(ACTION_HEAD)[0]
    pairs = [line.removesuffix(")").rpartition(" (") for line in menu.splitlines()]
    return [p[2] for p in pairs], [p[0] for p in pairs]


# Task splits are a fixed seeded permutation of each stage's start tasks, cut 60/10/30. The seed is
# a constant so that the test tasks never change between runs, machines or users.
SPLIT_SEED = 20240219
SPLITS = ("train", "val", "test")


def split_tasks(starts: list, split: str) -> list:
    """The part of `starts` that belongs to `split`; the three parts are disjoint and cover `starts`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}': choose from {', '.join(SPLITS)}")
    order = random.Random(SPLIT_SEED).sample(starts, len(starts))
    n_train, n_val = int(0.6 * len(order)), int(0.1 * len(order))
    cut = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(order))}
    lo, hi = cut[split]
    return order[lo:hi]


# ----------------------------------------------------------------------------------------------
# DangerousTaxi: gymnasium's Taxi (the deterministic "dry" version) as text, where an action that
# changes nothing is dangerous and ends the episode.

TAXI_MAP = [
    "+---------+",
    "|R: | : :G|",
    "| : | : : |",
    "| : : : : |",
    "| | : | : |",
    "|Y| : |B: |",
    "+---------+",
]
STANDS = "RGYB"  # gymnasium's order: passenger location / destination index 0..3
STAND_CELLS = [(0, 0), (0, 4), (4, 0), (4, 3)]  # (row, col) of each stand
IN_TAXI = 4  # passenger location index meaning "aboard"
TAXI_ACTIONS = ["move south", "move north", "move east", "move west", "pick up", "drop off"]
MOVES = [(1, 0), (-1, 0), (0, 1), (0, -1)]  # (d_row, d_col) of actions 0..3


def encode(row: int, col: int, pass_loc: int, dest: int) -> int:
    """gymnasium's state number: ((row * 5 + col) * 5 + pass_loc) * 4 + dest, 0..499."""
    return ((row * 5 + col) * 5 + pass_loc) * 4 + dest


def decode(state: int) -> tuple[int, int, int, int]:
    """(row, col, pass_loc, dest) of a state number; pass_loc 0..3 is a stand, 4 is in the taxi."""
    rest, dest = divmod(state, 4)
    rest, pass_loc = divmod(rest, 5)
    row, col = divmod(rest, 5)
    return row, col, pass_loc, dest


def move_blocked(row: int, col: int, action: int) -> bool:
    """True if move `action` (0..3) from (row, col) hits the edge of the grid or a wall."""
    if action == 0:
        return row == 4
    if action == 1:
        return row == 0
    # Cell (row, col) is the character at column 2 * col + 1 of map line row + 1; the characters on
    # either side are ':' (open) or '|' (a wall, the outer frame included).
    return TAXI_MAP[row + 1][2 * col + 2 if action == 2 else 2 * col] == "|"


def taxi_transition(state: int, action: int) -> tuple[int, int, bool]:
    """gymnasium's Taxi dynamics: (next_state, raw_reward, terminated). A no-op keeps the state."""
    row, col, pass_loc, dest = decode(state)
    reward, terminated = -1, False
    if action < 4:
        if not move_blocked(row, col, action):
            row, col = row + MOVES[action][0], col + MOVES[action][1]
    elif action == 4:
        if pass_loc < 4 and STAND_CELLS[pass_loc] == (row, col):
            pass_loc = IN_TAXI
        else:
            reward = -10
    elif pass_loc == IN_TAXI and (row, col) in STAND_CELLS:
        # gymnasium lets the passenger out at any stand: at the destination that ends the episode
        # with +20; at another stand the passenger simply waits there again, at the usual -1.
        pass_loc = STAND_CELLS.index((row, col))
        if pass_loc == dest:
            reward, terminated = 20, True
    else:
        reward = -10
    return encode(row, col, pass_loc, dest), reward, terminated


def taxi_goal(stage: str, action: int, terminated: bool) -> bool:
    """Whether a transition that changed the state completes `stage`: a pick-up for "pickup",
    gymnasium's termination (the delivery) otherwise."""
    return action == 4 if stage == "pickup" else terminated


def taxi_action_cost(stage: str, state: int, action: int, dist) -> float:
    """Actions to the goal of `stage` when `action` is taken in `state`, given the distances `dist`
    of the other states."""
    nxt, _, terminated = taxi_transition(state, action)
    if nxt == state:
        return float("inf")  # dangerous: the episode ends in failure
    if taxi_goal(stage, action, terminated):
        return 1
    return float("inf") if terminated else 1 + dist[nxt]


@lru_cache(maxsize=None)
def taxi_distances(stage: str) -> tuple:
    """Fewest actions from each of the 500 states to the goal of `stage` (inf when out of reach),
    over the real dynamics and without dangerous actions, since those end the episode."""
    dist = [float("inf")] * 500
    changed = True
    while changed:  # relax until nothing improves: a shortest-path search on this small graph
        changed = False
        for state in range(500):
            best = min(taxi_action_cost(stage, state, action, dist) for action in range(6))
            if best < dist[state]:
                dist[state], changed = best, True
    return tuple(dist)


class DangerousTaxi:
    name = "taxi"
    stages = ("pickup", "dropoff", "full")  # the curriculum, in order
    default_horizon = 15
    context = 512  # tokens of the scratch model's context: a taxi prompt with its reflection fits
    reward_scale = 1.0  # rl.py trains on reward * reward_scale; taxi's are already of order 1
    options = {}  # make_env's "key=value" settings and their types: taxi has none

    def __init__(self, stage: str = "full", horizon: int = 15):
        if stage not in self.stages:
            raise ValueError(f"unknown stage '{stage}' for {self.name}: choose from {', '.join(self.stages)}")
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        self.stage, self.horizon = stage, horizon
        self.actions = list(TAXI_ACTIONS)
        self.state, self.steps, self.done, self.observation = None, 0, True, ""

    def tasks(self, split: str) -> list[int]:
        """Start states of this stage in `split`. The split is cut before the horizon filter, so a
        start keeps its split whatever the horizon. With the default 15 steps all 300 pickup and
        all 100 dropoff starts stay (they need at most 9), and 58 of the 300 full starts drop out
        (they need 16 to 18 steps)."""
        if self.stage == "dropoff":
            # the passenger is already aboard: the taxi anywhere, any destination
            starts = [encode(r, c, IN_TAXI, d) for r in range(5) for c in range(5) for d in range(4)]
        else:
            # gymnasium's 300 starts: the passenger waiting at a stand other than the destination
            starts = [encode(r, c, p, d) for r in range(5) for c in range(5) for p in range(4)
                      for d in range(4) if p != d]
        return [s for s in split_tasks(starts, split) if self.distance(s) <= self.horizon]

    def reset(self, task: int, seed: int | None = None) -> str:
        """Start an episode from state number `task`; taxi is deterministic, so `seed` is unused."""
        if not 0 <= task < 500:
            raise ValueError(f"taxi task must be a state number in 0..499, got {task}")
        self.state, self.steps, self.done = task, 0, False
        self.observation = self.render()
        return self.observation

    def step(self, i: int) -> tuple[float, bool, dict]:
        if self.done:
            raise RuntimeError("the episode is over: call reset() first")
        if not 0 <= i < len(self.actions):
            raise ValueError(f"action index {i} out of range 0..{len(self.actions) - 1}")
        nxt, raw, terminated = taxi_transition(self.state, i)
        dangerous = nxt == self.state  # checked on every step, the first included
        success = not dangerous and taxi_goal(self.stage, i, terminated)
        if dangerous:
            reward = -10 / 20
        elif success:
            # the delivery earns gymnasium's +20; a pick-up that ends the "pickup" stage earns the
            # same, so every stage has one clear success reward
            reward = 20 / 20
        else:
            reward = raw / 20
        self.state, self.steps = nxt, self.steps + 1
        self.done = dangerous or success or self.steps >= self.horizon
        self.observation = self.render()
        return reward, self.done, {"success": success, "dangerous": dangerous, "state": nxt}

    def distance(self, state: int | None = None) -> float:
        """Fewest actions from `state` (default: the current one) to this stage's goal."""
        return taxi_distances(self.stage)[self.state if state is None else state]

    def oracle(self) -> int:
        """A best action now: the first, in action order, that lies on a shortest path to the goal."""
        dist = taxi_distances(self.stage)
        costs = [taxi_action_cost(self.stage, self.state, a, dist) for a in range(len(self.actions))]
        return costs.index(min(costs))

    def render(self) -> str:
        """The map with markers (T taxi, P waiting passenger, D destination, O taxi on the waiting
        passenger, X taxi with the passenger aboard), then the status and the goal in words."""
        row, col, pass_loc, dest = decode(self.state)
        grid = [list(line) for line in TAXI_MAP]

        def put(cell, mark):
            grid[cell[0] + 1][2 * cell[1] + 1] = mark

        put(STAND_CELLS[dest], "D")
        waiting = pass_loc < 4
        if waiting:
            put(STAND_CELLS[pass_loc], "P")
        if pass_loc == IN_TAXI:
            put((row, col), "X")
        else:
            put((row, col), "O" if waiting and STAND_CELLS[pass_loc] == (row, col) else "T")
        where = f"waiting at {STANDS[pass_loc]}" if waiting else "in the taxi"
        goal = {"pickup": "pick up the passenger.",
                "dropoff": "drop the passenger off at the destination.",
                "full": "deliver the passenger to the destination."}[self.stage]
        # the frame's top and bottom lines carry no information and cost ~10 tokens: leave them out
        return "\n".join("".join(line) for line in grid[1:-1]) + (
            f"\nPassenger: {where}. Destination: {STANDS[dest]}.\nGoal: {goal}")


# ----------------------------------------------------------------------------------------------
# AutoExplore: find the file in a code repository that answers a question, by navigating it with
# `cd <dir>`, `cd ..`, `cat <file>` and `id <file>`. Everything the agent can do goes through the
# sandbox functions below: read-only, pure Python, every path resolved and kept inside the root.

SKIP_NAMES = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", ".mypy_cache", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")
MAX_ENTRIES = 30  # a listing shows at most this many entries, so that prompts fit the context
READ_BYTES = 1 << 20  # a file is read up to this many bytes, whatever its size


def shown(name: str) -> str:
    """A file name as the agent sees it: plain if it is printable ASCII without spaces or quotes,
    else a JSON string, so spaces, newlines and non-ASCII characters cannot break the text."""
    plain = name.isascii() and name.isprintable() and not any(c in name for c in " \"'`;,")
    return name if plain else json.dumps(name)


def inside(root: str, path: str) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `root` (itself a resolved path)."""
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def list_dir(root: str, rel: tuple) -> tuple[list[str], list[str], int]:
    """(sub-directories, files, entries not shown) of directory `rel` (a tuple of names under
    `root`), sorted. Left out: caches and compiled files, symlinked directories (they could loop),
    and anything that resolves outside the root. Past MAX_ENTRIES the rest is counted, not shown."""
    path = os.path.join(root, *rel)
    if not inside(root, path):
        return [], [], 0
    dirs, files = [], []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.name in SKIP_NAMES or entry.name.endswith(SKIP_SUFFIXES):
                    continue
                if not inside(root, entry.path):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                    elif entry.is_file():  # follows a symlink, which `inside` has kept in the root
                        files.append(entry.name)
                except OSError:
                    continue
    except OSError:
        return [], [], 0
    dirs.sort()
    files.sort()
    extra = max(0, len(dirs) + len(files) - MAX_ENTRIES)
    files = files[:max(0, MAX_ENTRIES - len(dirs))]
    return dirs[:MAX_ENTRIES], files, extra


def read_text(root: str, rel: tuple, name: str) -> tuple[str | None, str]:
    """(the file's text, "") or (None, why it cannot be shown). At most READ_BYTES are read."""
    path = os.path.join(root, *rel, name)
    if not inside(root, path):
        return None, "refused: outside the repository"
    try:
        with open(path, "rb") as f:
            data = f.read(READ_BYTES)
    except OSError as e:
        return None, f"cannot read: {e.strerror or 'error'}"
    if b"\0" in data[:4096]:
        return None, f"binary file, {os.path.getsize(path)} bytes"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, f"binary file, {os.path.getsize(path)} bytes"


def walk(root: str):
    """(folder, its listed files, entries not shown) of every folder the listings reach, depth first."""
    stack = [()]
    while stack:
        rel = stack.pop()
        dirs, files, extra = list_dir(root, rel)
        stack += [rel + (d,) for d in dirs]
        yield rel, files, extra


def view(text: str, chars: int) -> str:
    """What `cat` shows: non-blank lines, each clipped to 100 characters, up to `chars` characters,
    then a note of how much was left out."""
    lines = [line.rstrip()[:100] for line in text.splitlines() if line.strip()]
    if not lines:
        return "(empty file)"
    out, used = [], 0
    for i, line in enumerate(lines):
        if used + len(line) > chars:
            return "\n".join(out) + f"\n[... {len(lines) - i} more lines not shown]"
        out.append(line)
        used += len(line) + 1
    return "\n".join(out)


def target_depth(task: dict) -> int:
    """Directories between the root and the nearest target."""
    return min(t.count("/") for t in task["targets"])


def level(task: dict) -> int:
    """The curriculum level of a task: 0 for a target at depth 0 or 1, 1 at depth 2, 2 deeper."""
    return min(max(target_depth(task) - 1, 0), 2)


# Tasks come from the repository's own content, no language model: one (kind, question, evidence)
# per fact; a task is kept only if its evidence shows in the `cat` view of a target, so an agent can
# recognise the answer when it reads it. Names stand in the question after a space, as in the code,
# so that byte-level BPE cuts them into the same tokens in both (a backquote before `Doc` would not).
def file_facts(name: str, text: str) -> list[tuple[str, str, str]]:
    """The facts one file offers: definitions and docstrings of Python code, Markdown headings,
    CSV columns, JSON keys."""
    facts = []
    if name.endswith(".py"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):
            return []
        doc = (ast.get_docstring(tree) or "").strip().split("\n")[0]
        if len(doc.split()) >= 4:
            facts.append(("module", f'Which module is described as "{doc}"?', doc))
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("__") or len(node.name) < 3:
                continue
            if isinstance(node, ast.ClassDef):
                facts.append(("class", f"Which file defines the class {node.name}?", f"class {node.name}"))
            else:
                facts.append(("function", f"Which file defines the function {node.name}?", f"def {node.name}("))
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
            if len(doc.split()) >= 4 and node.name not in doc:
                facts.append(("docstring", f'Which file has the code that does this: "{doc}"?', doc))
    elif name.endswith((".md", ".markdown")):
        for line in text.splitlines():
            heading = line.lstrip("#").strip()
            if line.startswith("#") and len(heading.split()) >= 2:
                facts.append(("heading", f'Which document has the section "{heading}"?', line.strip()))
    elif name.endswith((".csv", ".tsv")):
        header = text.split("\n", 1)[0].strip()
        columns = [c.strip() for c in header.split("\t" if name.endswith(".tsv") else ",")]
        if len(columns) >= 2 and all(columns):
            facts.append(("table", f"Which file is a table with the columns {', '.join(columns)}?", header))
    elif name.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError:
            return []
        if isinstance(data, dict) and len(data) >= 2:
            keys = list(data)[:4]
            facts.append(("json", f"Which JSON file has the keys {', '.join(map(str, keys))}?", json.dumps(keys[0])))
    return facts


def question_evidence(question: str) -> list[str]:
    """What a file's text must show to answer a question of file_facts, read from the question alone:
    the definition's start, the quoted text, or the listed keys or columns (for other questions,
    every word of four letters or more)."""
    m = re.fullmatch(r"Which file defines the (class|function) (.+)\?", question)
    if m:
        return [f"class {m[2]}" if m[1] == "class" else f"def {m[2]}("]
    m = re.search(r'"(.+)"', question)
    if m:
        return [m[1]]
    m = re.fullmatch(r"Which (?:JSON file has the keys|file is a table with the columns) (.+)\?", question)
    return m[1].split(", ") if m else [w for w in re.findall(r"\w+", question)[1:] if len(w) >= 4]


QUESTION_WORDS = set("which file defines the class function module described has code that does this document "
                     "section json keys table with columns".split())


def name_words(text: str) -> set[str]:
    """The lower-case words of a name or question, camelCase and snake_case split, of three letters or more."""
    return {w.lower() for w in re.split(r"[^A-Za-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", text))
            if len(w) >= 3} - QUESTION_WORDS


def repo_tasks(root: str, view_chars: int, per_level: int = 120) -> list[dict]:
    """Up to `per_level` tasks of `root` (a resolved path) per curriculum level, the kinds taken in
    turn, chosen by a seeded draw. A task's targets are every file with the fact, shown or not."""
    facts = {}  # question -> {"kind", "evidence", "targets", "seen"}
    for rel, files, _ in walk(root):
        for name in files:
            text, _ = read_text(root, rel, name)
            if text is None:
                continue
            cat_view = view(text, view_chars)
            for kind, question, evidence in file_facts(name, text):
                fact = facts.setdefault(question, {"kind": kind, "evidence": evidence, "targets": set(), "seen": False})
                fact["targets"].add("/".join(rel + (name,)))
                fact["seen"] |= evidence in cat_view
    groups = {}  # (level, kind) -> tasks
    for question in sorted(facts):
        fact = facts[question]
        if fact["seen"] and len(fact["targets"]) <= 3:  # a name defined all over the tree asks nothing
            task = {"repo": root, "question": question, "targets": sorted(fact["targets"]),
                    "kind": fact["kind"], "evidence": fact["evidence"]}
            groups.setdefault((level(task), fact["kind"]), []).append(task)
    rng = random.Random(f"{SPLIT_SEED}/{os.path.basename(root)}")
    tasks = []
    for lv in range(3):
        kinds = [rng.sample(g, len(g)) for (l, _), g in sorted(groups.items()) if l == lv]
        turns = [g[i] for i in range(max(map(len, kinds), default=0)) for g in kinds if i < len(g)]
        tasks += turns[:per_level]
    return tasks


def installed_repos(max_files: int = 800) -> list[str]:
    """The default repositories: source trees of the packages that requirements.txt installs, with
    what they pull in, found where they are installed; trees of more than `max_files` files (torch,
    transformers, numpy, sympy) are left out."""
    from importlib import metadata
    from packaging.requirements import Requirement
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "requirements.txt")) as f:
        queue = [Requirement(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()]
    seen, roots = set(), set()
    while queue:
        req = queue.pop()
        if req.name.lower() in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(req.name.lower())
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        queue += [Requirement(r) for r in dist.requires or []]
        roots |= {os.path.realpath(f.locate().parent) for f in dist.files or []
                  if len(f.parts) == 2 and f.parts[1] == "__init__.py"}
    keep = []
    for root in sorted(roots):
        n_files = 0
        for _, files, extra in walk(root):
            n_files += len(files) + extra  # what is not shown counts too
            if n_files > max_files:
                break
        else:
            keep.append(root)
    return keep


def reachable(root: str, target: str) -> bool:
    """Whether the agent can reach and read `target` ("a/b.py") through the listings alone."""
    *rel, name = target.split("/")
    for i in range(len(rel) + 1):
        dirs, files, _ = list_dir(root, tuple(rel[:i]))
        if name not in files if i == len(rel) else rel[i] not in dirs:
            return False
    return True


def read_task_file(path: str) -> list[dict]:
    """Tasks written by hand or by a large model: a JSON list of {"repo": directory, "question":
    text, "targets": [paths relative to repo]} ("target": one path also works)."""
    try:
        with open(path) as f:
            items = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tasks file {path}: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"tasks file {path}: expected a JSON list of tasks")
    tasks = []
    for i, item in enumerate(items):
        targets = item.get("targets") or [item.get("target")] if isinstance(item, dict) else None
        if not targets or not all(isinstance(t, str) for t in targets) or not isinstance(item.get("question"), str):
            raise ValueError(f"tasks file {path}, task {i}: needs \"repo\", \"question\" and \"targets\"")
        root = os.path.realpath(str(item.get("repo")))
        if not os.path.isdir(root):
            raise ValueError(f"tasks file {path}, task {i}: repository {item.get('repo')!r} does not exist")
        for t in targets:
            if not reachable(root, t):
                raise ValueError(f"tasks file {path}, task {i}: target {t!r} is not a file the agent can reach")
        tasks.append({"repo": root, "question": item["question"], "targets": sorted(targets), "kind": "user",
                      "evidence": ""})
    return tasks


# Each repository's split is a hash of its name alone, cut 60/10/30, so that installing another
# package adds its tasks without moving any other repository. REPO_SEED was picked among
# SPLIT_SEED + 0..199 as one where, on the default packages, train and test both have deeper tasks
# (setuptools in test, networkx in train) and validation has depth-2 ones.
REPO_SEED = SPLIT_SEED + 42


def repo_split(root: str) -> str:
    u = int(hashlib.sha256(f"{REPO_SEED}/{os.path.basename(root)}".encode()).hexdigest(), 16) / 16 ** 64
    return "train" if u < 0.6 else "val" if u < 0.7 else "test"


@lru_cache(maxsize=None)
def load_tasks(repos: tuple, tasks_file: str, view_chars: int) -> tuple:
    """Every task with its split, from `tasks_file` or else generated from `repos`. The split is by
    repository (test repositories are never seen in training), by the hash of each one's name when
    that gives every split a repository, else by a seeded permutation; with fewer than three
    repositories it is by task. The choice and the task counts are printed once."""
    if tasks_file:
        tasks = read_task_file(tasks_file)
    else:
        tasks = [t for root in repos or installed_repos() for t in repo_tasks(root, view_chars)]
    if not tasks:
        raise ValueError("no tasks: the repositories offer no questions (see envs.file_facts)")
    roots = sorted({t["repo"] for t in tasks})
    split_of = {r: repo_split(r) for r in roots}
    if set(split_of.values()) != set(SPLITS):  # a few repositories: a seeded permutation of them
        split_of = {r: split for split in SPLITS for r in split_tasks(roots, split)}
    lines = [f"autoexplore: {len(tasks)} tasks from {len(roots)} repositories"]
    for split in SPLITS:
        if len(roots) >= 3:
            part = [t for t in tasks if split_of[t["repo"]] == split]
        else:
            part = split_tasks(tasks, split)
        for t in part:
            t["split"] = split
        levels = [level(t) for t in part]
        names = ", ".join(sorted({os.path.basename(t["repo"]) for t in part}))
        lines.append(f"  {split}: {len(part)} tasks ({levels.count(0)} at depth 0-1, {levels.count(1)} at 2, "
                     f"{levels.count(2)} deeper) from {names}")
    print("\n".join(lines))
    return tuple(tasks)


class AutoExplore:
    name = "autoexplore"
    stages = ("depth1", "depth2", "deeper")  # nearest target at depth 0-1, 2, 3 and more
    default_horizon = 15
    context = 1024  # a listing, a file's view and the menu need room
    options = {"repos": str, "tasks": str, "leave_out": float, "view_chars": int}

    def __init__(self, stage: str = "deeper", horizon: int = 15, repos: str = "", tasks: str = "",
                 leave_out: float = 0.0, view_chars: int = 400):
        """repos: directories separated by os.pathsep ("" means the installed packages); tasks: a
        JSON file of tasks instead; leave_out: chance that an entry unrelated to the targets is left
        out of a listing, in training tasks only; view_chars: how much of a file `cat` shows."""
        if stage not in self.stages:
            raise ValueError(f"unknown stage '{stage}' for {self.name}: choose from {', '.join(self.stages)}")
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        if not 0 <= leave_out < 1:
            raise ValueError(f"leave_out must be in [0, 1), got {leave_out}")
        roots = tuple(os.path.realpath(r) for r in repos.split(os.pathsep) if r)
        for given, root in zip(filter(None, repos.split(os.pathsep)), roots):
            if not os.path.isdir(root):
                raise ValueError(f"repository path does not exist: {given}")
        if tasks and not os.path.isfile(tasks):
            raise ValueError(f"tasks file does not exist: {tasks}")
        self.stage, self.horizon, self.leave_out, self.view_chars = stage, horizon, leave_out, view_chars
        self.source = (roots, tasks, view_chars)
        self.reward_scale = 1 / horizon  # rl.py trains on reward * reward_scale, of order 1
        self.task, self.steps, self.done, self.observation, self.actions = None, 0, True, "", []

    def tasks(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}': choose from {', '.join(SPLITS)}")
        stage = self.stages.index(self.stage)
        return [t for t in load_tasks(*self.source) if t["split"] == split and level(t) == stage
                and target_depth(t) + 2 <= self.horizon]

    def reset(self, task: dict, seed: int | None = None) -> str:
        self.task, self.root = task, task["repo"]
        self.seed = seed if seed is not None else 0
        self.cwd, self.read, self.history, self.result = (), [], [], "(nothing yet)"  # read: paths, in order
        self.entered = set()  # folders moved into (for scripted)
        self.steps, self.done = 0, False
        # the targets and the directories above them are never left out of a listing
        self.keep = {tuple(t.split("/")[:i]) for t in task["targets"] for i in range(1, t.count("/") + 2)}
        self.refresh()
        return self.observation

    def listing(self, rel: tuple) -> tuple[list[str], list[str], int]:
        dirs, files, extra = list_dir(self.root, rel)
        if self.leave_out and self.task.get("split") == "train":
            def kept(name):
                path = rel + (name,)
                return path in self.keep or random.Random(f"{self.seed}/{path}").random() >= self.leave_out
            dirs, files = list(filter(kept, dirs)), list(filter(kept, files))
        return dirs, files, extra

    def refresh(self):
        """Recompute the admissible commands and the observation text. The menu puts the moves a
        reflection can name without a name first: `id` of the last file read here (label 0 whenever
        there is one), the first unread file (read down the list), `cd ..`; then the folders, the
        other unread files, and `id` of the earlier reads here (the last read first)."""
        dirs, files, extra = self.listing(self.cwd)
        ids = [("id", p[-1]) for p in reversed(self.read) if p[:-1] == self.cwd and p[-1] in files]
        cats = [("cat", f) for f in files if self.cwd + (f,) not in self.read]
        self.commands = ids[:1] + cats[:1] + ([("cd", "..")] if self.cwd else []) + \
            [("cd", d) for d in dirs] + cats[1:] + ids[1:]
        self.actions = [f"{verb} {name if name == '..' else shown(name)}" for verb, name in self.commands]
        # entries not yet tried first, then those done (folders entered, files read), so that the
        # analysis can tell from the observation alone what is left to try (the history shows only 4)
        names = [(shown(d) + "/", self.cwd + (d,) in self.entered) for d in dirs] + \
            [(shown(f), self.cwd + (f,) in self.read) for f in files]
        here = " ".join(n for n, done in names if not done) or ("(nothing new)" if names else "(empty)")
        done = " ".join(n for n, done in names if done)
        self.state = "/".join(self.cwd)
        self.observation = (f"Task: {self.task['question']}\n"
                            f"Directory: {'/'.join((os.path.basename(self.root),) + self.cwd)}/\n"
                            f"Here: {here}" + (f" (+{extra} more not shown)" if extra else "") + "\n"
                            + (f"Done here: {done}\n" if done else "") +
                            f"History: {'; '.join(self.history[-4:]) or '(none)'}\n"
                            f"Result: {self.result}")

    def step(self, i: int) -> tuple[float, bool, dict]:
        if self.done:
            raise RuntimeError("the episode is over: call reset() first")
        if not 0 <= i < len(self.actions):
            raise ValueError(f"action index {i} out of range 0..{len(self.actions) - 1}")
        (verb, name), cost, success = self.commands[i], 1.0, False
        if verb == "cd" and name == "..":
            self.cwd, self.result = self.cwd[:-1], "moved up"
        elif verb == "cd":
            if os.access(os.path.join(self.root, *self.cwd, name), os.R_OK | os.X_OK):
                self.cwd, self.result = self.cwd + (name,), f"moved into {shown(name)}/"
                self.entered.add(self.cwd)
            else:
                cost, self.result = cost + 1, f"error: cannot open {shown(name)}/"
        elif verb == "cat":
            self.read.append(self.cwd + (name,))
            text, why = read_text(self.root, self.cwd, name)
            # an unreadable file is an error; a binary one, a warning
            cost += 0 if text is not None else 0.5 if why.startswith("binary") else 1
            self.result = view(text, self.view_chars) if text is not None else f"{'warning' if cost < 2 else 'error'}: {why}"
        else:
            success = "/".join(self.cwd + (name,)) in self.task["targets"]
            self.result = "correct" if success else "wrong file"
        self.history.append(self.actions[i])
        self.steps += 1
        reward = -cost + (self.horizon if success else -self.horizon if verb == "id" else 0)
        self.done = verb == "id" or self.steps >= self.horizon
        self.refresh()
        return reward, self.done, {"success": success, "dangerous": False}

    def plan(self, target: str) -> list[tuple[str, str]]:
        """The shortest command sequence from here to identifying `target`."""
        *tdir, name = target.split("/")
        common = 0
        while common < min(len(self.cwd), len(tdir)) and self.cwd[common] == tdir[common]:
            common += 1
        read = [] if tuple(tdir) + (name,) in self.read else [("cat", name)]
        return [("cd", "..")] * (len(self.cwd) - common) + [("cd", d) for d in tdir[common:]] + read + [("id", name)]

    def distance(self) -> int:
        return min(len(self.plan(t)) for t in self.task["targets"])

    def oracle(self) -> int:
        """The first command of a shortest plan to the nearest target (ties: the first in order)."""
        plan = min((self.plan(t) for t in self.task["targets"]), key=len)
        return self.commands.index(plan[0])

    def scripted(self) -> int:
        """A reference without learning that never looks at the targets: `id` when the file just read
        shows the question's evidence (question_evidence: what `grep` would look for), else read or
        enter the unread file or new folder whose name matches the question best (name_match; files
        first on a tie, then menu order), else go up."""
        q = self.task["question"]
        if self.history[-1:] and self.history[-1].startswith("cat ") and self.commands[0][0] == "id" \
                and all(e in self.result for e in question_evidence(q)):
            return 0
        words = name_words(q)
        moves = [(name_match(words, n)[0] + (verb == "cat") / 2, -i) for i, (verb, n) in enumerate(self.commands)
                 if verb == "cat" or (verb == "cd" and n != ".." and self.cwd + (n,) not in self.entered)]
        return -max(moves)[1] if moves else self.commands.index(("cd", "..")) if self.cwd else 0


def name_match(words: set[str], name: str) -> tuple[int, str]:
    """How well a file or folder name matches the question's words (name_words): 10 per shared word,
    plus the length of the longest question word inside the name's stem (or the stem inside it); and
    the question word that matched best ("" if none)."""
    base = name.rsplit(".", 1)[0]
    stem = base.lstrip("_").lower()
    shared = words & name_words(base)
    inside = [w for w in words if w in stem or (len(stem) >= 3 and stem in w)]
    best = max(shared or inside, key=lambda w: (len(w), w), default="")
    return 10 * len(shared) + max(map(len, inside), default=0), best


# ----------------------------------------------------------------------------------------------
# Household: text household games on TextWorld, the engine ALFWorld is built on. Games are made by
# TextWorld's own generator (simple quests and cooking quests), reproducibly by seed, and cached;
# the same class plays ALFWorld's own game files (game.tw-pddl) when a user has them. textworld and
# alfworld are imported only here, inside functions, so taxi users never need them.

INFO_COMMANDS = {"look", "inventory", "help"}  # they only show what every observation already shows
TEXT_LIMITS = {"Goal": 320, "Here": 360, "Carrying": 120, "Feedback": 200}  # characters per section
HISTORY = 4  # commands shown in the observation's history
COMPASS = ("north", "east", "south", "west")  # clockwise
COMPASS_FACTS = {f"{d}_of" for d in COMPASS}  # TextWorld's north_of(a, b): a lies north of b


def clean_text(text: str, limit: int) -> str:
    """Game text without banners, ASCII art, prompts and end-of-game boilerplate, whitespace
    collapsed, cut at `limit` characters with a visible " [...]"."""
    kept = []
    for line in text.splitlines():
        line = line.strip()
        glyphs = line.replace(" ", "")
        if not glyphs or line.startswith((">", "***", "Would you like to RESTART", "You scored ")):
            continue
        if sum(c.isalpha() for c in glyphs) < len(glyphs) / 2:  # ASCII art: mostly $ \ | _ / and the like
            continue
        kept.append(line)
    text = " ".join(" ".join(kept).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " [...]"
    return text


def recipe(game) -> str:
    """What a cooking game's cookbook asks for, as a sentence for the goal ("" for other games).
    TextWorld's objective only says to read the cookbook, and its walkthrough never does, so without
    this no observation would tell which food on the shelf is the one to take."""
    ingredients = [item[0] for item in game.metadata.get("ingredients", [])]
    return f" The cookbook's recipe needs: {', '.join(ingredients)}." if ingredients else ""


def household_game_kind(stage: str, index: int) -> tuple[str, int]:
    """Which generator makes game `index` of `stage`: ("simple", quest length) or ("cooking", rooms).
    Stage len1 and len2 are simple quests of one and two steps (TextWorld's quest length: now and then
    a walkthrough is shorter); full alternates simple quests of three steps with cooking quests in one
    kitchen or six rooms (walkthroughs of 3 to about 9 steps)."""
    if stage != "full":
        return "simple", 1 if stage == "len1" else 2
    return ("simple", 3) if index % 2 == 0 else ("cooking", 1 if index % 4 == 1 else 6)


def household_game_seed(stage: str, index: int) -> int:
    """Game `index` of stage k: seed SPLIT_SEED + 1000 k + index below 1000; from 1000 on the stages
    take turns after the last block (k = 0, 1, 2, 0, ...), so that no two games share a seed."""
    k, n = Household.stages.index(stage), len(Household.stages)
    return SPLIT_SEED + (1000 * k + index if index < 1000 else 1000 * n + n * (index - 1000) + k)


def make_household_game(path: str, stage: str, index: int, split: str) -> None:
    """Generate and compile one game into path (.z8, plus TextWorld's .json beside it). The seed
    is fixed by stage and index; cooking games of the val and test splits use TextWorld's own held-out
    foods and preparations. Files appear only when complete (written aside, then renamed)."""
    import shutil
    import tempfile
    import textworld
    from textworld.challenges.tw_cooking import cooking

    kind, size = household_game_kind(stage, index)
    options = textworld.GameOptions()
    options.seeds = household_game_seed(stage, index)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path))
    options.path = os.path.join(tmp, "game.z8")
    if kind == "simple":
        options.nb_rooms, options.nb_objects, options.quest_length = 2, 5, size
        game = textworld.generator.make_game(options)
    else:
        settings = {"recipe": 1, "take": 1, "go": size, "open": True, "cook": False, "cut": False,
                    "drop": False, "recipe_seed": index + 1, "split": {"val": "valid"}.get(split, split)}
        game = cooking.make(settings, options)
    textworld.generator.compile_game(game, options)
    # now and then the walkthrough does not win: TextWorld's parser cannot tell two objects apart
    # ("Which do you mean, the Microsoft style locker or the locker?"); such a game is marked as
    # ALFWorld marks its unsolvable ones, and tasks() leaves it out
    with warnings.catch_warnings():  # jericho's, as in Household._load
        warnings.simplefilter("ignore")
        env = textworld.start(options.path, textworld.EnvInfos(policy_commands=True, won=True))
        state = env.reset()
        for command in state["policy_commands"]:
            state, _, _ = env.step(command)
        env.close()
    if not state["won"]:
        with open(os.path.join(tmp, "game.json")) as f:
            data = json.load(f)
        with open(os.path.join(tmp, "game.json"), "w") as f:
            json.dump({**data, "solvable": False}, f)
    base = os.path.splitext(path)[0]
    os.replace(os.path.join(tmp, "game.json"), base + ".json")  # the .json first: a .z8 means both exist
    os.replace(os.path.join(tmp, "game.z8"), base + ".z8")
    shutil.rmtree(tmp)


def household_game_path(games_dir: str, stage: str, index: int, split: str) -> str:
    """Where game `index` of `stage` is cached. A cooking game's name carries its split, whose foods
    it uses, so a cache made with another n_games (which moves games between splits) is never misread."""
    tail = f"-{split}" if household_game_kind(stage, index)[0] == "cooking" else ""
    return os.path.join(games_dir, stage, f"{index:04d}{tail}.z8")


def household_games(games_dir: str, n_games: int, extra_train: int = 0) -> dict[str, list[str]]:
    """The paths of the n_games games of each stage, in games_dir/<stage>/, then extra_train more
    training games (numbers n_games on, so the split of the first n_games stays as it is). Missing games
    (of every stage at once) are generated in parallel, with a progress bar; a second call finds them."""
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm

    split_of = {i: split for split in SPLITS for i in split_tasks(list(range(n_games)), split)}
    split_of.update({i: "train" for i in range(n_games, n_games + extra_train)})
    paths = {s: [household_game_path(games_dir, s, i, split_of[i]) for i in range(n_games + extra_train)]
             for s in Household.stages}
    jobs = [(p, s, i, split_of[i]) for s in paths for i, p in enumerate(paths[s]) if not os.path.isfile(p)]
    if jobs:
        for s in paths:
            os.makedirs(os.path.join(games_dir, s), exist_ok=True)
        with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
            for _ in tqdm(pool.map(make_household_game, *zip(*jobs)), total=len(jobs),
                          desc=f"generating household games into {games_dir}"):
                pass
    return paths


def wall_order(history: list[str]) -> tuple[str | None, list[str]]:
    """The last move among the history's shown commands (None if none) and the wall follower's
    order of directions after it: right of it, straight on, left, back (as if north when None)."""
    moves = [c[3:] for c in history[-HISTORY:] if c.startswith("go ")]
    k = COMPASS.index(moves[-1]) if moves else 0
    return (moves[-1] if moves else None), [COMPASS[(k + i) % 4] for i in (1, 0, 3, 2)]


def room_exits(facts) -> dict[str, str | None]:
    """{direction: its door or None} of the player's room, from TextWorld's facts (the room's
    description says the same: "There is a closed wooden door leading north")."""
    room = next(f.arguments[1].name for f in facts if f.name == "at" and f.arguments[0].name == "P")
    exits = {f.name[:-3]: None for f in facts if f.name in COMPASS_FACTS and f.arguments[1].name == room}
    for f in facts:  # link(room, door, other) and <dir>_of(other, room): the exit to <dir> has that door
        if f.name == "link" and f.arguments[0].name == room:
            exits.update({g.name[:-3]: f.arguments[1].name for g in facts if g.name in COMPASS_FACTS
                          and g.arguments[0].name == f.arguments[2].name and g.arguments[1].name == room})
    return exits


def explore_move(facts, history: list[str]) -> str:
    """The wall follower's move, from what the observation shows: the first exit of the room in
    wall_order, its door opened first if it is closed. It finds every room of TextWorld's small
    maps without a map (docs/household.md)."""
    exits = room_exits(facts)
    closed = {f.arguments[0].name for f in facts if f.name == "closed"}
    d = next(d for d in wall_order(history)[1] if d in exits)
    return f"open {exits[d]}" if exits[d] in closed else f"go {d}"


class Household:
    name = "household"
    stages = ("len1", "len2", "full")  # quests of 1 step, 2 steps, 3 or more (see household_game_kind)
    default_horizon = 15
    context = 512  # a goal, a room, the history and up to ~25 commands fit
    reward_scale = 1.0  # rewards are already the score change over the maximum score
    # make_env's "key=value" settings: where generated games are cached, how many per stage
    # (cut 60/10/30 into train/val/test), how many more training games to add (val and test stay the
    # same), ALFWorld's data directory (plays its games instead), and max_steps, the horizon for the
    # scripts that have no --horizon flag (0: keep the given horizon), and explore (1: the oracle finds
    # its way as an agent could, see searching)
    options = {"games_dir": str, "n_games": int, "extra_train": int, "alfworld": str, "max_steps": int,
               "explore": int}

    def __init__(self, stage: str = "full", horizon: int = 15, games_dir: str = "data/household/games",
                 n_games: int = 600, extra_train: int = 0, alfworld: str = "", max_steps: int = 0,
                 explore: int = 0):
        if stage not in self.stages:
            raise ValueError(f"unknown stage '{stage}' for {self.name}: choose from {', '.join(self.stages)}")
        horizon = max_steps or horizon
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        if n_games < 3:
            raise ValueError(f"n_games must be at least 3 (train, val and test games), got {n_games}")
        if extra_train < 0:
            raise ValueError(f"extra_train must be at least 0, got {extra_train}")
        if alfworld and not os.path.isdir(alfworld):
            raise ValueError(f"ALFWorld data directory '{alfworld}' does not exist (see the README)")
        if explore not in (0, 1) or (explore and alfworld):
            raise ValueError(f"explore must be 0 or 1, and 0 with ALFWorld's games, got {explore}")
        self.stage, self.horizon, self.explore = stage, horizon, explore
        self.games_dir, self.n_games, self.extra_train, self.alfworld = games_dir, n_games, extra_train, alfworld
        self.actions, self.observation, self.steps, self.done = [], "", 0, True
        self.task, self._env, self._game_path, self._game_state, self._split_cache = None, None, None, None, {}
        self._inform7 = (None, None)  # (TextWorld game, its command writer), for walkthrough_after

    # -- tasks: game files ---------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        """Game files of this stage in `split` whose walkthrough wins and fits in the horizon. ALFWorld data
        keeps its own splits: train, valid_seen (val) and valid_unseen (test), where it has them."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}': choose from {', '.join(SPLITS)}")
        if split not in self._split_cache:
            if self.alfworld:
                every = sorted(g for g in glob.glob(os.path.join(self.alfworld, "**", "game.tw-pddl"), recursive=True)
                               if "movable" not in g and "Sliced" not in g)  # left out by ALFWorld's text env too
                folder = {"train": "train", "val": "valid_seen", "test": "valid_unseen"}[split]
                games = [g for g in every if f"{os.sep}{folder}{os.sep}" in g]
                if not any(f"{os.sep}{f}{os.sep}" in g for g in every for f in ("train", "valid_seen", "valid_unseen")):
                    games = split_tasks(every, split)  # not ALFWorld's layout: our own 60/10/30 cut
            else:
                every = household_games(self.games_dir, self.n_games, self.extra_train)[self.stage]
                games = split_tasks(every[:self.n_games], split) + (every[self.n_games:] if split == "train" else [])
            self._split_cache[split] = [g for g in games if self._walkthrough_fits(g)]
        return self._split_cache[split]

    def _walkthrough_fits(self, path: str) -> bool:
        with open(os.path.splitext(path)[0] + ".json" if path.endswith(".z8") else path) as f:
            data = json.load(f)
        if data.get("solvable") is False:  # ALFWorld marks the games its planner could not solve
            return False
        walkthrough = data.get("metadata", data).get("walkthrough")
        return walkthrough is None or self.stage != "full" or len(walkthrough) <= self.horizon

    # -- playing -------------------------------------------------------------------------------
    def _load(self, path: str):
        import textworld
        infos = textworld.EnvInfos(objective=True, description=True, inventory=True, admissible_commands=True,
                                   policy_commands=True, won=True, lost=True, score=True, max_score=True,
                                   facts=path.endswith(".tw-pddl") or bool(self.explore), extras=["expert_plan"])
        wrappers = []
        if path.endswith(".tw-pddl"):  # ALFWorld: its object names and its expert (the PDDL planner)
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert
            wrappers = [AlfredDemangler(), AlfredExpert(expert_type="planner")]
        with warnings.catch_warnings():  # jericho warns that it cannot detect TextWorld's score: we read it
            warnings.simplefilter("ignore")
            return textworld.start(path, infos, wrappers=wrappers)

    def reset(self, task: str, seed: int | None = None) -> str:
        """Start game file `task`. The games are deterministic, so `seed` is unused. On ALFWorld
        games the stages len1 and len2 start where the expert has one or two steps left to play."""
        if task != self._game_path:  # a new game: load it (the same game again is only reset)
            if self._env is not None:
                self._env.close()
            self._env, self._game_path = self._load(task), task
        self.task, self._commands, self.steps, self.done = task, [], 0, False
        self._game_state = self._env.reset()
        self._intro = self._game_state.feedback
        if task.endswith(".tw-pddl") and self.stage != "full":
            keep = self.stages.index(self.stage) + 1
            while len(self.walkthrough()) > keep:
                self._play(self.walkthrough()[0])
        self._history, self._feedback = [], None
        self._update()
        return self.observation

    def _play(self, command: str) -> float:
        before = self._game_state.get("score") or 0  # ALFWorld's games have a score only after a step
        self._game_state, _, _ = self._env.step(command)
        self._commands.append(command)
        return (self._game_state.get("score") or 0) - before

    def step(self, i: int) -> tuple[float, bool, dict]:
        if self.done:
            raise RuntimeError("the episode is over: call reset() first")
        if not 0 <= i < len(self.actions):
            raise ValueError(f"action index {i} out of range 0..{len(self.actions) - 1}")
        command = self.actions[i]
        gained = self._play(command)
        self._history.append(command)
        self._feedback = self._game_state.feedback
        self.steps += 1
        success = bool(self._game_state["won"])
        self.done = success or bool(self._game_state["lost"]) or self.steps >= self.horizon
        self._update()
        # the score change, scaled so that winning a game adds up to 1 (ALFWorld: 1 for the win)
        reward = gained / (self._game_state.get("max_score") or 1)
        return reward, self.done, {"success": success, "dangerous": False, "lost": bool(self._game_state["lost"])}

    def _update(self):
        """The action list and the observation text of the current game state."""
        state = self._game_state
        actions = [c for c in state["admissible_commands"] if c not in INFO_COMMANDS]
        if len(actions) > len(LABELS):  # too many for one-token labels: the inspections go first
            actions = [c for c in actions if not c.startswith("examine ")]
        if len(actions) > len(LABELS):
            raise ValueError(f"{self.task}: {len(actions)} actions now, more than the {len(LABELS)} labels")
        self.actions = actions
        if self.task.endswith(".tw-pddl"):  # ALFWorld: the intro has the room and the task
            scene, _, goal = self._intro.partition("Your task is to:")
            sections = {"Goal": goal, "Here": scene.split("=-", 2)[-1], "Carrying": None}
        else:
            sections = {"Goal": state["objective"] + recipe(state["game"]), "Here": state["description"],
                        "Carrying": state["inventory"]}
        sections = {k: None if v is None else clean_text(v, TEXT_LIMITS[k]) for k, v in sections.items()}
        sections["History"] = "; ".join(self._history[-HISTORY:]) or "none yet"
        feedback = self._feedback and clean_text(self._feedback, TEXT_LIMITS["Feedback"])
        # after a move the feedback is the new room's description, already shown under Here
        sections["Feedback"] = "(the room above)" if feedback and feedback[:40] == sections["Here"][:40] else feedback
        self.observation = "\n".join(f"{k}: {v}" for k, v in sections.items() if v is not None)

    @property
    def state(self) -> dict:
        """JSON-able: the game and the commands played, which replay the state exactly."""
        return {"game": self.task, "commands": list(self._commands)}

    # -- privileged: the oracle ------------------------------------------------------------------
    def walkthrough(self) -> list[str]:
        """The commands that win from here: TextWorld's walkthrough (policy_commands) on generated
        games, ALFWorld's expert (its PDDL planner) on ALFWorld's. While searching, the walkthrough's
        moves are left out and explore_move comes first."""
        plan = list(self._game_state["extra.expert_plan" if self.task.endswith(".tw-pddl") else "policy_commands"])
        if not self.searching():
            return plan
        return [explore_move(self._game_state["facts"], self._history)] + [c for c in plan if not self._moving(c)]

    def _moving(self, command: str) -> bool:
        doors = {f.arguments[1].name for f in self._game_state["facts"] if f.name == "link"}
        return command.startswith("go ") or (command.startswith("open ") and command[5:] in doors)

    def searching(self) -> bool:
        """With explore, whether the oracle finds the way as an agent could: the walkthrough of a
        cooking game would move or open a door next, which no observation shows (a simple quest's
        goal says which way to go), and the time left allows a step off the walkthrough (one move
        changes its length by at most one, so it always still fits)."""
        plan = self._game_state["policy_commands"] if self.explore else None
        return bool(plan and self._moving(plan[0]) and recipe(self._game_state["game"])
                    and self.horizon - self.steps >= len(plan) + 2)

    def wall(self) -> tuple[str | None, list[str], list[str]]:
        """While searching: the last move shown, the wall follower's order and the room's exits in it."""
        last, order = wall_order(self._history)
        return last, order, [d for d in order if d in room_exits(self._game_state["facts"])]

    def oracle(self) -> int:
        """The index of the walkthrough's next command."""
        return self.actions.index(self.walkthrough()[0])

    def walkthrough_after(self, i: int) -> list[str] | None:
        """The walkthrough after action i, or None if action i loses the game. Generated games are
        simulated on a copy of TextWorld's logic state; ALFWorld games are replayed on a second copy."""
        command = self.actions[i]
        if self.task.endswith(".tw-pddl"):
            sim = self._load(self.task)
            sim.reset()
            for c in self._commands + [command]:
                state, _, _ = sim.step(c)
            sim.close()
            return list(state["extra.expert_plan"])
        from textworld.generator.inform7 import Inform7Game
        if self._inform7[0] is not self._game_state["game"]:
            self._inform7 = (self._game_state["game"], Inform7Game(self._game_state["game"]))
        inform7 = self._inform7[1]
        valid = self._game_state["_valid_actions"]
        progression = self._game_state["_game_progression"].copy()
        progression.update(valid[inform7.gen_commands_from_actions(valid).index(command)])
        if progression.failed or progression.winning_policy is None:
            return None
        return inform7.gen_commands_from_actions(progression.winning_policy)


ENVS = {"taxi": DangerousTaxi, "autoexplore": AutoExplore, "household": Household}


def make_env(name: str, stage: str | None = None, horizon: int | None = None, options: str = ""):
    """The environment `name` at `stage` (default: its last, the full task) and `horizon`. `options`
    is "key=value,key=value" for the environment's own settings (see its __init__)."""
    if name not in ENVS:
        raise ValueError(f"unknown environment '{name}': choose from {', '.join(ENVS)}")
    cls = ENVS[name]
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in cls.options:
            known = ", ".join(cls.options) or "none"
            raise ValueError(f"bad option '{item}' for {name}: use key=value with a key from: {known}")
        kwargs[key] = cls.options[key](value)
    stage = cls.stages[-1] if stage is None else stage
    return cls(stage, cls.default_horizon if horizon is None else horizon, **kwargs)
