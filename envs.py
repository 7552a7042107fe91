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
import random
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


ENVS = {"taxi": DangerousTaxi}


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
