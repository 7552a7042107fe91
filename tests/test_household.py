"""Household: game generation by seed and disjoint splits, the walkthrough oracle on every game,
observation cleaning, an ALFWorld-format game won by ALFWorld's expert, the teacher's data, and a
tiny end-to-end run of every stage (data_gen -> sft -> rl -> eval) in subprocesses."""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_gen  # noqa: E402
import envs  # noqa: E402

N_GAMES = 10  # per stage: 6 train, 1 val, 3 test


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    """The options string of a small cache of generated games, made once for every test here."""
    games_dir = str(tmp_path_factory.mktemp("games"))
    envs.household_games(games_dir, N_GAMES)
    return f"games_dir={games_dir},n_games={N_GAMES}"


def play_oracle(env, task):
    env.reset(task)
    total, done = 0.0, False
    while not done:
        reward, done, info = env.step(env.oracle())
        total += reward
    return total, info


def test_generation_by_seed_and_disjoint_splits(games, tmp_path):
    games_dir = games.split(",")[0].split("=")[1]
    split_of = {i: split for split in envs.SPLITS for i in envs.split_tasks(list(range(N_GAMES)), split)}
    for stage in envs.Household.stages:
        env = envs.make_env("household", stage, options=games)
        splits = [set(env.tasks(split)) for split in envs.SPLITS]
        assert [len(s) for s in splits] == [6, 1, 3]
        assert splits == [{envs.household_game_path(games_dir, stage, i, split) for i in range(N_GAMES)
                           if split_of[i] == split} for split in envs.SPLITS]
    # a cooking game's cache name carries its split (another n_games moves games between splits)
    assert os.path.basename(envs.household_game_path(games_dir, "full", 1, "val")) == "0001-val.z8"
    assert os.path.basename(envs.household_game_path(games_dir, "full", 0, "val")) == "0000.z8"
    # a game made again from its stage and index is the same game (TextWorld's .json holds all of it)
    for stage, index, kind in (("len2", 0, "simple"), ("full", 1, "cooking")):
        assert envs.household_game_kind(stage, index)[0] == kind
        envs.make_household_game(str(tmp_path / f"{stage}.z8"), stage, index, split_of[index])
        cached = os.path.splitext(envs.household_game_path(games_dir, stage, index, split_of[index]))[0]
        with open(cached + ".json") as a, open(tmp_path / f"{stage}.json") as b:
            assert json.load(a) == json.load(b)
    # the cache is found again: nothing is generated, so this is instant
    before = os.path.getmtime(os.path.join(games_dir, "len1", "0000.z8"))
    envs.household_games(games_dir, N_GAMES)
    assert os.path.getmtime(os.path.join(games_dir, "len1", "0000.z8")) == before


def test_extra_training_games_leave_val_and_test_alone(games):
    games_dir = games.split(",")[0].split("=")[1]
    for stage in envs.Household.stages:
        plain = envs.make_env("household", stage, options=games)
        more = envs.make_env("household", stage, options=games + ",extra_train=2")
        extra = [envs.household_game_path(games_dir, stage, i, "train") for i in (N_GAMES, N_GAMES + 1)]
        assert more.tasks("train") == plain.tasks("train") + extra and all(os.path.isfile(p) for p in extra)
        assert more.tasks("val") == plain.tasks("val") and more.tasks("test") == plain.tasks("test")
    with pytest.raises(ValueError, match="extra_train must be at least 0"):
        envs.make_env("household", "len1", options=f"games_dir={games_dir},extra_train=-1")


def test_game_seeds_unique_and_unchanged_below_1000():
    seeds = [envs.household_game_seed(s, i) for s in envs.Household.stages for i in range(2500)]
    assert len(set(seeds)) == len(seeds)
    assert [envs.household_game_seed(s, 7) for s in envs.Household.stages] == \
        [envs.SPLIT_SEED + 7, envs.SPLIT_SEED + 1007, envs.SPLIT_SEED + 2007]


@pytest.mark.parametrize("stage", envs.Household.stages)
def test_walkthrough_oracle_wins_every_game(games, stage):
    env = envs.make_env("household", stage, options=games)
    lengths = []
    for split in envs.SPLITS:
        for task in env.tasks(split):
            total, info = play_oracle(env, task)
            assert info["success"] and not info["dangerous"] and env.steps <= env.horizon, (task, env.steps)
            assert abs(total - 1.0) < 1e-9  # the score changes add up to the whole score, scaled to 1
            lengths.append(env.steps)
    assert max(lengths) <= {"len1": 1, "len2": 2, "full": env.horizon}[stage]
    if stage == "full":
        assert min(lengths) >= 3


def test_explore_move_follows_the_wall():
    from textworld.logic import Proposition, Variable
    hall, kitchen, garden = Variable("hall", "r"), Variable("kitchen", "r"), Variable("garden", "r")
    door = Variable("wooden door", "d")
    facts = [Proposition("at", [Variable("P", "P"), hall]),
             Proposition("north_of", [kitchen, hall]), Proposition("south_of", [hall, kitchen]),
             Proposition("east_of", [garden, hall]), Proposition("west_of", [hall, garden]),
             Proposition("link", [hall, door, kitchen]), Proposition("link", [kitchen, door, hall])]
    closed = facts + [Proposition("closed", [door])]
    # right of the last move, straight on, left, back; with no move shown, as if the last was north
    assert envs.explore_move(closed, []) == "go east"
    assert envs.explore_move(closed, ["go south"]) == "go east"  # west and south: no exit
    assert envs.explore_move(closed, ["go west", "take apple"]) == "open wooden door"
    assert envs.explore_move(facts, ["go west"]) == "go north"
    # only the history's shown commands count: an older move is forgotten
    assert envs.explore_move(closed, ["go west", "look", "look", "look", "look"]) == "go east"


def test_exploring_oracle_finds_the_way(games):
    plain = envs.make_env("household", "full", options=games)
    env = envs.make_env("household", "full", options=games + ",explore=1")
    kinds, searched, off = set(), 0, 0
    for task in (t for split in envs.SPLITS for t in env.tasks(split)):
        kind, rooms = envs.household_game_kind("full", int(os.path.basename(task)[:4]))
        kinds.add(rooms if kind == "cooking" else kind)
        env.reset(task)
        for played in [[]] + [[c] for c in env.actions if c.startswith("go ")]:  # from the start, and one move on
            env.reset(task)
            plain.reset(task)
            for command in played:
                env.step(env.actions.index(command))
                plain.step(plain.actions.index(command))
            done = False
            while not done:
                command, walkthrough = env.actions[env.oracle()], plain.walkthrough()
                if command != walkthrough[0]:  # off the walkthrough only to find the way in a cooking game
                    assert kind == "cooking" and command.startswith(("go ", "open ")), command
                    off += 1
                time = env.horizon - env.steps >= len(walkthrough) + 2
                if kind == "cooking" and walkthrough[0].startswith("go ") and time:
                    assert command == envs.explore_move(env._game_state["facts"], played)  # where the wall leads
                    last, order, exits = env.wall()  # the teacher's reasoning: the first exit in the order
                    text = data_gen.household_reflection(env, env.oracle(), random.Random(0), None)
                    assert f"try {', '.join(order)}; exits: {', '.join(exits)}. Next: {command}." in text
                    assert command in (f"go {exits[0]}", f"open {envs.room_exits(env._game_state['facts'])[exits[0]]}")
                    searched += 1
                _, done, info = env.step(env.oracle())
                plain.step(plain.actions.index(command))
                played = played + [command]
            assert info["success"] and env.steps <= env.horizon, (task, env.steps)
    assert kinds == {"simple", 1, 6} and searched > 0 and off > 0
    with pytest.raises(ValueError, match="explore must be 0 or 1"):
        envs.make_env("household", "full", options="explore=2")


def test_a_game_whose_walkthrough_fails_is_left_out(games, tmp_path):
    # len2 game 432 names two lockers that TextWorld's parser cannot tell apart, so its own
    # walkthrough never wins; generation marks it and no split offers it
    games_dir = tmp_path / "games"  # the shared cache, linked, with len2's game 0 replaced by it
    shutil.copytree(games.split(",")[0].split("=")[1], games_dir, copy_function=os.link)
    envs.make_household_game(str(games_dir / "len2" / "0000.z8"), "len2", 432, "train")
    with open(games_dir / "len2" / "0000.json") as f:
        assert json.load(f)["solvable"] is False
    env = envs.make_env("household", "len2", options=f"games_dir={games_dir},n_games={N_GAMES}")
    kept = [t for split in envs.SPLITS for t in env.tasks(split)]
    assert len(kept) == N_GAMES - 1 and str(games_dir / "len2" / "0000.z8") not in kept


def test_observation_cleaning_and_truncation(games):
    raw = ("\n\n   ________  ________\n  |        \\|        \\\n   \\$$$$$$$$| $$$$$$$$\n\n"
           "Welcome to TextWorld! Find the key.\n\n-= Attic =-\nA dusty attic.\n\n"
           ">  -= Attic =-0/3\n*** The End ***\nYou scored 1 out of a possible 1, in 4 turns.\n"
           "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n>")
    assert envs.clean_text(raw, 200) == "Welcome to TextWorld! Find the key. -= Attic =- A dusty attic."
    assert envs.clean_text("one two three four", 12) == "one two [...]"
    assert envs.clean_text("short", 12) == "short"

    env = envs.make_env("household", "full", options=games)
    obs = env.reset(env.tasks("test")[0])
    lines = obs.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Goal", "Here", "Carrying", "History"]
    assert lines[3] == "History: none yet" and "$$" not in obs and ">" not in obs
    for line in lines[:3]:
        key, text = line.split(": ", 1)
        assert len(text) <= envs.TEXT_LIMITS[key] + len(" [...]")
    assert not set(env.actions) & envs.INFO_COMMANDS and len(env.actions) <= len(envs.LABELS)
    env.step(env.oracle())
    assert env.observation.splitlines()[3] == f"History: {env.state['commands'][0]}"
    assert env.observation.splitlines()[4].startswith("Feedback: ")


def test_cooking_goal_names_the_recipe(games):
    # TextWorld's walkthrough never reads the cookbook, so the goal must say which food to take
    env = envs.make_env("household", "full", options=games)
    kinds = []
    for task in [t for split in envs.SPLITS for t in env.tasks(split)]:
        goal = env.reset(task).splitlines()[0]
        with open(os.path.splitext(task)[0] + ".json") as f:
            ingredients = [item[0] for item in json.load(f)["metadata"].get("ingredients", [])]
        kinds.append(bool(ingredients))
        assert goal.endswith(f" The cookbook's recipe needs: {', '.join(ingredients)}.") == bool(ingredients)
        assert ("recipe needs" in goal) == bool(ingredients)
        for food in ingredients:
            assert any(c.startswith(f"take {food}") for c in env.walkthrough()), (task, food)
    assert set(kinds) == {True, False}  # full has cooking games and simple quests


def test_made_up_food_names(games, tmp_path):
    # --made_up_food=1: the food of every cooking episode renamed, the same in all its records (an
    # episode that starts with a detour in the policy and plain files follows the previous one's
    # draw); everything else unchanged
    made = {}
    for name, p in (("real", 0.0), ("made", 1.0)):
        data_gen.generate("household", str(tmp_path / name), 4, 1, 0.5, 0, env_options=games, made_up_food=p)
        made[name] = {f: [json.loads(line) for line in open(tmp_path / name / f)]
                      for f in sorted(os.listdir(tmp_path / name)) if f.endswith(".jsonl")}
    recipe = lambda r: re.search(r"The cookbook's recipe needs: (.+?)\.\n", r["prompt"])
    renamed = 0
    for f, real in made["real"].items():
        episodes, last = [], None
        for a, b in zip(real, made["made"][f], strict=True):
            state = a["state"]
            played = last["commands"] if last else None
            if last is None or state["game"] != last["game"] or state["commands"][:len(played)] != played:
                episodes.append([])
            episodes[-1].append((a, b))
            last = state
        for episode in episodes:
            names = set()
            for a, b in episode:
                assert {k: v for k, v in a.items() if k not in ("prompt", "completion")} == \
                       {k: v for k, v in b.items() if k not in ("prompt", "completion")}
                food, new = recipe(a)[1] if recipe(a) else None, recipe(b)[1] if recipe(b) else None
                names.add(new)
                if food is None or a == b:
                    assert a == b
                    continue
                assert re.fullmatch(r"([bcdfghklmnprstvz][aeiou]){2,3}( ([bcdfghklmnprstvz][aeiou]){2,3})?", new)
                assert b["prompt"] == a["prompt"].replace(food, new) and food not in b["prompt"]
                assert b["completion"] == a["completion"].replace(food, new)
                renamed += 1
            assert len(names) == 1  # one name (or none) for the whole episode
            first = episode[0][0]
            if recipe(first) and not first["state"]["commands"]:
                assert episode[0][0] != episode[0][1]  # an episode seen from its start is always renamed
            if f.startswith("reflection"):  # every state is in the reflection files, the start too
                assert not first["state"]["commands"]
    assert renamed > 0


# An ALFWorld-format game written for this test from the PDDL domain and grammar that the alfworld
# package ships: a tomato on a countertop, a closed microwave; the goal is the tomato in the microwave.
TOMATO_PROBLEM = """(define (problem plan_tomato_in_microwave)
(:domain alfred)
(:objects
    agent1 - agent
    TomatoType - otype
    CounterTopType - rtype
    MicrowaveType - rtype
    Tomato_bar__plus_00_dot_10 - object
    CounterTop_bar__plus_01_dot_00 - receptacle
    Microwave_bar__plus_02_dot_00 - receptacle
    loc_bar_0_bar_0 - location
    loc_bar_1_bar_0 - location
    loc_bar_2_bar_0 - location
)
(:init
    (atLocation agent1 loc_bar_0_bar_0)
    (receptacleType CounterTop_bar__plus_01_dot_00 CounterTopType)
    (receptacleType Microwave_bar__plus_02_dot_00 MicrowaveType)
    (receptacleAtLocation CounterTop_bar__plus_01_dot_00 loc_bar_1_bar_0)
    (receptacleAtLocation Microwave_bar__plus_02_dot_00 loc_bar_2_bar_0)
    (openable Microwave_bar__plus_02_dot_00)
    (objectType Tomato_bar__plus_00_dot_10 TomatoType)
    (pickupable Tomato_bar__plus_00_dot_10)
    (heatable Tomato_bar__plus_00_dot_10)
    (canContain CounterTopType TomatoType)
    (canContain MicrowaveType TomatoType)
    (inReceptacle Tomato_bar__plus_00_dot_10 CounterTop_bar__plus_01_dot_00)
    (objectAtLocation Tomato_bar__plus_00_dot_10 loc_bar_1_bar_0)
)
(:goal (exists (?o - object ?r - receptacle)
    (and (objectType ?o TomatoType) (receptacleType ?r MicrowaveType) (inReceptacle ?o ?r))))
)
"""


@pytest.fixture(scope="module")
def alfworld_dir(tmp_path_factory):
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH
    root = tmp_path_factory.mktemp("alfworld")
    trial = root / "pick_and_place_simple-Tomato-None-Microwave-1" / "trial_1"
    trial.mkdir(parents=True)
    with open(ALFRED_PDDL_PATH) as f:
        domain = f.read()
    with open(ALFRED_TWL2_PATH) as f:  # ALFWorld writes each game's task into its grammar
        grammar = f.read().replace("UNKNOWN GOAL", "put a tomato in microwave")
    game = {"pddl_domain": domain, "grammar": grammar, "pddl_problem": TOMATO_PROBLEM, "solvable": True}
    (trial / "game.tw-pddl").write_text(json.dumps(game))
    # ALFWorld's expert wrapper reads the task parameters that ALFWorld keeps beside every game
    traj = {"task_type": "pick_and_place_simple",
            "pddl_params": {"object_target": "Tomato", "parent_target": "Microwave", "toggle_target": "",
                            "mrecep_target": "", "object_sliced": False}}
    (trial / "traj_data.json").write_text(json.dumps(traj))
    return str(root)


def test_alfworld_game_won_by_its_expert(alfworld_dir):
    env = envs.make_env("household", "full", options=f"alfworld={alfworld_dir}")
    assert env.tasks("train") == env.tasks("val") == []  # one game, not in ALFWorld's split folders
    (task,) = env.tasks("test")
    obs = env.reset(task)
    assert obs.splitlines()[0] == "Goal: put a tomato in microwave."
    assert "you see a countertop 1, and a microwave 1" in obs and "Welcome" not in obs
    assert env.actions == ["go to countertop 1", "go to microwave 1"]
    assert env.walkthrough() == ["go to countertop 1", "take tomato 1 from countertop 1", "go to microwave 1",
                                 "open microwave 1", "move tomato 1 to microwave 1"]
    # a detour replayed on a second copy: going to the microwave first costs one step more
    assert env.walkthrough_after(env.actions.index("go to microwave 1"))[0] == "go to countertop 1"
    plan = env.walkthrough()
    total, info = play_oracle(env, task)
    assert info["success"] and env.steps == 5 and total == 1.0
    assert env.state == {"game": task, "commands": plan}
    # the curriculum on ALFWorld's games: the expert plays all but the last step(s) before the start
    for stage, steps in (("len1", 1), ("len2", 2)):
        short = envs.make_env("household", stage, options=f"alfworld={alfworld_dir}")
        short.reset(task)
        assert len(short.walkthrough()) == steps and short.observation.splitlines()[2] == "History: none yet"
        assert play_oracle(short, task)[1]["success"] and short.steps == steps


def run(script, *args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_end_to_end_and_teacher_data(games, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    env_args = ["--env=household", f"--env_options={games}"]
    run("data_gen.py", *env_args, f"--out_dir={data}", "--episodes=4", "--val_episodes=1", "--neg_prob=0.5")
    # every policy target is the walkthrough's next command, replayed from the recorded state; a
    # negative record's reflection owns up to the detour that the state's last command was
    records = [json.loads(line) for line in open(os.path.join(data, "policy_train.jsonl"))]
    negatives = [json.loads(line) for line in open(os.path.join(data, "reflection_train.jsonl"))
                 if '"negative": true' in line]
    assert negatives and {r["stage"] for r in records} == set(envs.Household.stages)
    for r in records + negatives:
        env = envs.make_env("household", r["stage"], options=games)
        env.reset(r["state"]["game"])
        for command in r["state"]["commands"]:
            env.step(env.actions.index(command))
        assert r["prompt"].startswith(env.observation + "\n")
        if r in negatives:
            assert f"'{r['state']['commands'][-1]}'" in r["completion"].split(". ")[0]
            assert r["completion"].endswith(f" Next: {env.actions[env.oracle()]}.")
        else:
            assert r["completion"] == envs.LABELS[env.oracle()]
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=600", "--batch_size=8", "--eval_interval=2",
            "--eval_batches=1", "--device=cpu", "--max_iters=2"]
    run("sft.py", "--env=household", f"--data_dir={data}", f"--out_dir={out}", "--init_from=scratch", "--rename=1", *tiny)
    for model in ("sft_reflection", "sft_policy", "sft_plain"):  # from scratch the household default adds the LM loss
        config = json.loads(open(os.path.join(out, model, "log.jsonl")).readline())["config"]
        assert config["lm_loss"] == 1.0 and config["rename"] == 1
    run("rl.py", *env_args, f"--out_dir={out}", "--num_envs=2", "--minibatch_size=4", "--reflection_max_tokens=8",
        "--device=cpu", "--curriculum", "--schedule=fixed", "--stage_iters=1,1,1", "--total_iters=3")
    logs = [json.loads(line) for line in open(os.path.join(out, "rl", "log.jsonl")) if '"iter"' in line]
    assert [r["stage"] for r in logs] == list(envs.Household.stages)
    run("eval.py", *env_args, f"--out_dir={out}", "--episodes=2", "--stages=len1", "--reflection_max_tokens=8",
        "--device=cpu")
    results = json.load(open(os.path.join(out, "eval.json")))["stages"]["len1"]["results"]
    oracle = next(r for r in results if r["method"] == "Oracle")
    assert {"SFT", "Reflect-RL", "Random"} <= {r["method"] for r in results} and oracle["success"] == 1.0
