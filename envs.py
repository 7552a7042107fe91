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
"""
import glob
import json
import os
import random
import warnings
from functools import lru_cache

# ----------------------------------------------------------------------------------------------
# The prompt (single-prompt action enumeration): one prompt lists every action with a label and the
# policy answers with the label alone. Each label is one character, one token in GPT-2's tokenizer.

LABELS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def analyze_prompt(obs: str) -> str:
    """What the reflection model sees; it continues with its analysis."""
    return obs + "\n # Analyze:\n"


def policy_prompt(obs: str, actions: list[str], reflection: str | None = None, labels=LABELS) -> str:
    """What the policy sees; label i belongs to action i (callers may pass labels permuted)."""
    if len(actions) > len(labels):
        raise ValueError(f"{len(actions)} actions but only {len(labels)} labels")
    head = obs + "\n" if reflection is None else analyze_prompt(obs) + reflection + "\n"
    menu = "".join(f"{labels[i]}. {a}\n" for i, a in enumerate(actions))
    return head + "# Choose from below your action:\n" + menu + " # Action:\n"


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
# Household: text household games on TextWorld, the engine ALFWorld is built on. Games are made by
# TextWorld's own generator (simple quests and cooking quests), reproducibly by seed, and cached;
# the same class plays ALFWorld's own game files (game.tw-pddl) when a user has them. textworld and
# alfworld are imported only here, inside functions, so taxi users never need them.

INFO_COMMANDS = {"look", "inventory", "help"}  # they only show what every observation already shows
TEXT_LIMITS = {"Goal": 320, "Here": 360, "Carrying": 120, "Feedback": 200}  # characters per section
HISTORY = 4  # commands shown in the observation's history


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


def household_game_kind(stage: str, index: int) -> tuple[str, int]:
    """Which generator makes game `index` of `stage`: ("simple", quest length) or ("cooking", rooms).
    Stage len1 and len2 are simple quests of one and two steps (TextWorld's quest length: now and then
    a walkthrough is shorter); full alternates simple quests of three steps with cooking quests in one
    kitchen or six rooms (walkthroughs of 3 to about 9 steps)."""
    if stage != "full":
        return "simple", 1 if stage == "len1" else 2
    return ("simple", 3) if index % 2 == 0 else ("cooking", 1 if index % 4 == 1 else 6)


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
    options.seeds = SPLIT_SEED + 1000 * Household.stages.index(stage) + index
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
    base = os.path.splitext(path)[0]
    os.replace(os.path.join(tmp, "game.json"), base + ".json")  # the .json first: a .z8 means both exist
    os.replace(os.path.join(tmp, "game.z8"), base + ".z8")
    shutil.rmtree(tmp)


def household_games(games_dir: str, n_games: int) -> dict[str, list[str]]:
    """The paths of the n_games games of each stage, in games_dir/<stage>/. Missing games (of every
    stage at once) are generated in parallel, with a progress bar; a second call finds them there."""
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm

    paths = {s: [os.path.join(games_dir, s, f"{i:04d}.z8") for i in range(n_games)] for s in Household.stages}
    split_of = {i: split for split in SPLITS for i in split_tasks(list(range(n_games)), split)}
    jobs = [(p, s, i, split_of[i]) for s in paths for i, p in enumerate(paths[s]) if not os.path.isfile(p)]
    if jobs:
        for s in paths:
            os.makedirs(os.path.join(games_dir, s), exist_ok=True)
        with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
            for _ in tqdm(pool.map(make_household_game, *zip(*jobs)), total=len(jobs),
                          desc=f"generating household games into {games_dir}"):
                pass
    return paths


class Household:
    name = "household"
    stages = ("len1", "len2", "full")  # quests of 1 step, 2 steps, 3 or more (see household_game_kind)
    default_horizon = 15
    # make_env's "key=value" settings: where generated games are cached, how many per stage
    # (cut 60/10/30 into train/val/test), ALFWorld's data directory (plays its games instead), and
    # max_steps, the horizon for the scripts that have no --horizon flag (0: keep the given horizon)
    options = {"games_dir": str, "n_games": int, "alfworld": str, "max_steps": int}

    def __init__(self, stage: str = "full", horizon: int = 15, games_dir: str = "data/household/games",
                 n_games: int = 100, alfworld: str = "", max_steps: int = 0):
        if stage not in self.stages:
            raise ValueError(f"unknown stage '{stage}' for {self.name}: choose from {', '.join(self.stages)}")
        horizon = max_steps or horizon
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        if n_games < 3:
            raise ValueError(f"n_games must be at least 3 (train, val and test games), got {n_games}")
        if alfworld and not os.path.isdir(alfworld):
            raise ValueError(f"ALFWorld data directory '{alfworld}' does not exist (see the README)")
        self.stage, self.horizon = stage, horizon
        self.games_dir, self.n_games, self.alfworld = games_dir, n_games, alfworld
        self.actions, self.observation, self.steps, self.done = [], "", 0, True
        self.task, self._env, self._game_path, self._game_state, self._split_cache = None, None, None, None, {}
        self._inform7 = (None, None)  # (TextWorld game, its command writer), for walkthrough_after

    # -- tasks: game files ---------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        """Game files of this stage in `split` whose walkthrough fits in the horizon. ALFWorld data
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
                games = split_tasks(household_games(self.games_dir, self.n_games)[self.stage], split)
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
                                   facts=path.endswith(".tw-pddl"), extras=["expert_plan"])
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
            sections = {"Goal": state["objective"], "Here": state["description"], "Carrying": state["inventory"]}
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
        games, ALFWorld's expert (its PDDL planner) on ALFWorld's."""
        return list(self._game_state["extra.expert_plan" if self.task.endswith(".tw-pddl") else "policy_commands"])

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


ENVS = {"taxi": DangerousTaxi, "household": Household}


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
