"""
Supervised fine-tuning data for Reflect-RL: teacher trajectories with negative examples.

The teacher follows the environment's oracle. At some steps (probability neg_prob) it takes a wrong
but legal detour instead, and at the next state its reflection names the mistake, what it cost, and
the recovery. (With --explore_teacher=search, AutoExplore's scripted search leads instead: it
uses only what the prompt shows, its failed episodes are left out, and its own reads of wrong
files are the negative examples. In AutoExplore a wrong file in a target's folder is the first
unread one, and the teacher reads on down the list until the target is next.) The wrong action is
never a policy target: at the state where it was taken only the reflection record (the correct
analysis) is written, and the recovery step that follows is a policy target marked negative=true.
The teacher is a privileged template writer (it reads the true state), so generation needs no
network and is deterministic by seed. With --teacher=llm a chat-completions endpoint writes every reflection
instead, as GPT-4 did in the paper, given what the template teacher knows (llm_teach); the
episodes, and so the states and targets, stay those of the template teacher.

Files written to out_dir, for split in train and val:
    reflection_{split}.jsonl   analyze prompt -> reflection
    policy_{split}.jsonl       prompt with the reflection -> action label
    plain_{split}.jsonl        prompt without a reflection -> action label (baselines)
    *_pos_{split}.jsonl        the same three from separate runs without negative examples (ablation)
    meta.json                  the config, record counts, and the time it took
    llm_cache/                 with --teacher=llm: every answer of the endpoint, by a hash of its request
Each record: {"prompt", "completion", "stage", "negative", "state"}; "state" is the environment's
state (taxi: the state number; household: the game file and the commands played, so a test can
check every target against the oracle; autoexplore: the current folder).

    python data_gen.py                      # defaults below, about 2 s on a laptop
    python data_gen.py --episodes=2000 --neg_prob=0.3 --shuffle_labels=true
    python data_gen.py --env=household      # generates the household games first (once, see README)
    python data_gen.py --env=household --made_up_food=0.5
    python data_gen.py --env=autoexplore --env_options=repos=/src/a:/src/b
    OPENAI_API_KEY=... python data_gen.py --teacher=llm --llm_model=gpt-4o     # pip install -r requirements-llm.txt
    python data_gen.py --teacher=llm --llm_base_url=http://localhost:11434/v1 --llm_model=llama3.1:8b  # a local server
"""
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

import envs

# ----------------------------------------------------------------------------------------------
# defaults, each can be overridden with --key=value
env = "taxi"  # environment name, one of envs.ENVS
env_options = ""  # the environment's own settings, "key=value,..." (see envs.make_env)
out_dir = ""  # where the JSONL files and meta.json go; "" means data/{env}
episodes = 0  # teacher episodes per stage for the train split (and as many for the _pos files);
              # 0 means the environment's default in ENV_DEFAULTS
val_episodes = 50  # teacher episodes per stage for the val split
neg_prob = -1.0  # chance per step that the teacher takes a detour (a negative example); -1 means
                 # the environment's default in ENV_DEFAULTS
shuffle_labels = False  # permute the action labels at every step, against position bias
made_up_food = 0.0  # household: the chance that a cooking episode's food takes a made-up name in all its
                    # records, so that the models learn to copy names they have never seen (docs/household.md)
explore_teacher = "oracle"  # autoexplore: who leads the episodes: "oracle" (straight to a target it knows, with
                            # detours) or "search" (envs.AutoExplore.scripted: name matching and the question's
                            # evidence, only what the prompt shows, so that every choice can be learned from it;
                            # episodes it fails are left out, its reads of wrong files are the negative examples)
seed = 0  # drives every random choice: the same seed writes byte-identical files
teacher = "template"  # who writes the reflections: "template" (offline) or "llm" (an OpenAI-compatible endpoint)
llm_model = ""  # with --teacher=llm: the endpoint's model name (gpt-4o, llama3.1:8b, ...), required
llm_base_url = ""  # "" means $OPENAI_BASE_URL, else OpenAI's; the key is only ever read from $OPENAI_API_KEY
llm_cache = ""  # folder of cached answers, one file per request; "" means {out_dir}/llm_cache
llm_workers = 4  # requests in flight at once
llm_timeout = 60.0  # seconds to wait for one answer
llm_retries = 5  # tries again after a 429, a 5xx, a timeout or a malformed answer before it stops
llm_backoff = 1.0  # seconds before the first of those tries, doubled for each next one
# ----------------------------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_")
               and isinstance(v, (bool, int, float, str))]

# AutoExplore needs more episodes (its tasks are many and varied) and more detours: without them
# nearly every `cat` in the data is of the answer, and the models learn to identify whatever they
# have just read. With 0.7 (and the seed that sft.py passes, 1337), 1520 of the 3600 reads of a target
# in the policy data come right after reading down the list, and 16672 of the 20272 reflections after
# a read say that the file was wrong.
ENV_DEFAULTS = {"taxi": {"episodes": 400, "neg_prob": 0.15}, "autoexplore": {"episodes": 1200, "neg_prob": 0.7},
                "household": {"episodes": 1200, "neg_prob": 0.15}}

# Reflection templates, one list per sentence of the chain of thought: where the taxi is, where the
# target is, the wall that matters, then the move and why. Several phrasings of each, so the model
# learns the content rather than one string; the last sentence is always "Next: <action>.".
MISTAKE = [
    "The last {move} was a detour away from the {target}; it cost a step.",
    "Taking {move} was a mistake: one step further from the {target}.",
    "The previous {move} went the wrong way, away from the {target}.",
    "That {move} took us a step away from the {target}.",
]
WHERE = ["Taxi at ({row},{col}).", "The taxi is at ({row},{col}).", "We are at ({row},{col})."]
WAITING = [
    "Passenger at {stand} ({row},{col}), {way}.",
    "The passenger waits at {stand} ({row},{col}), {way}.",
    "Target: the passenger at {stand} ({row},{col}), {way}.",
]
ABOARD = [
    "Passenger aboard, destination {stand} ({row},{col}), {way}.",
    "Target: the destination {stand} ({row},{col}), {way}.",
    "Drive the passenger to {stand} ({row},{col}), {way}.",
]
WALL = ["A wall blocks the way {dir}.", "Wall to the {dir}.", "Going {dir} would hit a wall."]
CLOSER = ["Moving {dir} gets closer.", "Heading {dir} shortens the trip.", "Going {dir} gets nearer."]
AROUND = ["Going {dir} leads around the wall.", "The way around the wall starts {dir}.",
          "The path bends {dir} around the wall."]
PICK_UP = ["The taxi is on the passenger's stand, so pick up.", "We have reached the passenger: pick up."]
DROP_OFF = ["The taxi is at the destination, so drop off.", "We have arrived: drop the passenger off."]


def compass(d_row: int, d_col: int) -> str:
    """Where a target at offset (d_row, d_col) lies from the taxi, in words."""
    if d_row == d_col == 0:
        return "right here"
    ns = "south" if d_row > 0 else "north" if d_row < 0 else ""
    ew = "east" if d_col > 0 else "west" if d_col < 0 else ""
    return "to the " + "-".join(w for w in (ns, ew) if w)


def taxi_reflection(taxi: envs.DangerousTaxi, best: int, rng: random.Random, detour: str | None) -> str:
    """The teacher's analysis of the current state, ending in `best`, the oracle's action. `detour`
    is the wrong move just taken (its text), if any, which the first sentence then owns up to."""
    row, col, pass_loc, dest = envs.decode(taxi.state)
    aboard = pass_loc == envs.IN_TAXI
    stand = dest if aboard else pass_loc  # the current target: the passenger, then the destination
    t_row, t_col = envs.STAND_CELLS[stand]
    # the moves that shrink the row or column gap to the target; a wall on one of them is what matters
    toward = [a for a, (dr, dc) in enumerate(envs.MOVES)
              if abs(t_row - row - dr) + abs(t_col - col - dc) < abs(t_row - row) + abs(t_col - col)]
    direction = [a.split()[-1] for a in taxi.actions]  # "move south" -> "south"

    sentences = []
    if detour is not None:
        target = "destination" if aboard else "passenger"
        sentences.append(rng.choice(MISTAKE).format(move=detour, target=target))
    sentences.append(rng.choice(WHERE).format(row=row, col=col))
    sentences.append(rng.choice(ABOARD if aboard else WAITING).format(
        stand=envs.STANDS[stand], row=t_row, col=t_col, way=compass(t_row - row, t_col - col)))
    sentences += [rng.choice(WALL).format(dir=direction[a]) for a in toward if envs.move_blocked(row, col, a)]
    if best == 4:
        sentences.append(rng.choice(PICK_UP))
    elif best == 5:
        sentences.append(rng.choice(DROP_OFF))
    else:
        # a shortest-path move that does not shrink the gap can only be going around a wall
        sentences.append(rng.choice(CLOSER if best in toward else AROUND).format(dir=direction[best]))
    sentences.append(f"Next: {taxi.actions[best]}.")
    return " ".join(sentences)


def taxi_detours(taxi: envs.DangerousTaxi) -> list[int]:
    """Wrong but legal moves now: they change the state (no wall bump, so never dangerous and never
    terminal) yet lead away from the goal, and still leave time to finish within the horizon."""
    here = taxi.distance()
    steps_left = taxi.horizon - taxi.steps
    detours = []
    for action in range(4):
        nxt, _, _ = envs.taxi_transition(taxi.state, action)
        if nxt != taxi.state and taxi.distance(nxt) >= here and 1 + taxi.distance(nxt) <= steps_left:
            detours.append(action)
    return detours


# AutoExplore: the teacher knows the targets. Its analysis owns up to a wrong command, says whether
# the last file read answers the task, and what kind of move comes next. It names no file or folder:
# when they did, the default scratch model wrote made-up names on held-out repositories (it cannot
# copy names it never saw in training), so the choice among the listed names is left to the policy,
# which picks a label rather than writing a name.
WRONG_FILE = ["The last file read does not answer the task.", "That file was wrong: it does not have what the task asks for."]
WRONG_DIR = ["That folder was the wrong way.", "Going into that folder was a mistake."]
WRONG_UP = ["Going up was a mistake.", "Leaving that folder was wrong."]
FOUND = ["The last file read has what the task asks for: it is the answer.", "The last file read answers the task."]
# Each move has one Next: text (the policy reads it, eval.py --check compares it); the sentence
# before it varies.
MOVES = {"up": ["Nothing here answers the task. Next: go up.", "The answer is not below here. Next: go up."],
         "down": ["The answer should be in a folder below. Next: go into a folder.",
                  "A folder here should hold the answer. Next: go into a folder."],
         "read": ["Next: read a file here.", "One of the files here should answer the task. Next: read a file here."],
         "id": ["Next: identify that file."]}


def explore_reflection(env: envs.AutoExplore, best: int, rng: random.Random, detour: str | None) -> str:
    verb, name = env.commands[best]
    sentences = []
    if detour is not None:
        template = WRONG_UP if detour == "cd .." else WRONG_FILE if detour.startswith("cat ") else WRONG_DIR
        sentences.append(rng.choice(template))
    if verb == "id":  # right after reading the answer: no detour comes between (explore_detours)
        sentences.append(rng.choice(FOUND))
        move = "id"
    else:
        move = "read" if verb == "cat" else "up" if name == ".." else "down"
    return " ".join(sentences + [rng.choice(MOVES[move])])


def explore_detours(env: envs.AutoExplore) -> list[int]:
    """A `cat` of a file that is not a target, or a `cd` off every shortest path, when there is
    still time to recover: a wrong file costs one step, a wrong folder two (there and back). In a
    target's folder, only the first unread file: the start of a read down the list. None once the
    answer is read: after a detour then, the observation no longer shows why that file is the answer
    (in a first version, half of the `id` records came after such a detour)."""
    left, here = env.horizon - env.steps, env.distance()
    good = {plan[0] for plan in (env.plan(t) for t in env.task["targets"]) if len(plan) == here}
    if any(verb == "id" for verb, _ in good):
        return []
    only = next_file(env) if any(verb == "cat" for verb, _ in good) else None  # in a target's folder
    out = []
    for i, (verb, name) in enumerate(env.commands):
        cost = {"cat": 1, "cd": 2}.get(verb)
        if cost and (verb, name) not in good and cost + here <= left and not is_target(env, i):
            if only is None or i == only:
                out.append(i)
    return out


def is_target(env: envs.AutoExplore, i: int) -> bool:
    return env.commands[i][0] == "cat" and "/".join(env.cwd + (env.commands[i][1],)) in env.task["targets"]


def next_file(env: envs.AutoExplore) -> int | None:
    """The first unread file of the menu: where a read down the list goes next."""
    return next((i for i, (verb, _) in enumerate(env.commands) if verb == "cat"), None)


def explore_follow(env: envs.AutoExplore, detour: str) -> int | None:
    """After a wrong file in a target's folder the teacher reads on down the list while the next file
    is not a target and time allows, so that its recovery, reading the target, is the next file."""
    i, best = next_file(env), env.oracle()
    if not detour.startswith("cat ") or env.commands[best][0] != "cat" or i is None or i == best:
        return None
    return i if not is_target(env, i) and 1 + env.distance() <= env.horizon - env.steps else None


def search_reflection(env: envs.AutoExplore, best: int) -> tuple[str, str | None]:
    """The search teacher's analysis, naming its command: whether the file just read shows the
    question's evidence, then the question's word and the name that holds it, in that order (each
    part copies what comes before it); and the file read in vain just before, if any (that step's
    miss, the negative example)."""
    verb, name = env.commands[best]
    evidence = ", ".join(f'"{e}"' for e in envs.question_evidence(env.task["question"]))
    if verb == "id":
        return f"{envs.shown(name)} shows {evidence}: it answers the task. Next: {env.actions[best]}.", None
    missed = env.history[-1][4:] if env.history[-1:] and env.history[-1].startswith("cat ") else None
    sentences = [f"{missed} does not show {evidence}."] if missed else []
    if name == "..":
        sentences.append("Nothing here is left to try.")
    else:
        word = envs.name_match(envs.name_words(env.task["question"]), name)[1]
        sentences.append(f'The task says "{word}": {envs.shown(name)} matches.' if word else "No name here matches the task.")
    return " ".join(sentences + [f"Next: {env.actions[best]}."]), missed


# The household teacher reads the walkthrough (TextWorld's, or ALFWorld's expert) at every step.
OFF_PLAN = [
    "'{move}' is not on the walkthrough: it wasted a step.",
    "The last command, '{move}', was a detour; it did not bring the goal closer.",
    "Doing '{move}' was a mistake: the walkthrough did not ask for it.",
]
PLAN = ["The walkthrough has {n} step{s} left: {steps}.", "{n} step{s} to go: {steps}.",
        "Remaining plan ({n} step{s}): {steps}."]
PLAN_SHOWN = 3  # walkthrough steps named in a reflection; the rest are counted
EXPLORE_SLACK = 6  # with explore=1, steps kept free for finding the way (the wall follower's detour)


def household_reflection(env: envs.Household, best: int, rng: random.Random, detour: str | None) -> str:
    """What went wrong (after a detour), what the walkthrough says is left, then its next command
    (with explore, while searching, worked out from the wall follower's order and the room's exits)."""
    plan = env.walkthrough()
    assert plan[0] == env.actions[best]
    sentences = [] if detour is None else [rng.choice(OFF_PLAN).format(move=detour)]
    steps = ", then ".join(plan[:PLAN_SHOWN]) + (", ..." if len(plan) > PLAN_SHOWN else "")
    sentences.append(rng.choice(PLAN).format(n=len(plan), s="" if len(plan) == 1 else "s", steps=steps))
    if env.searching():  # with explore: the way, worked out from what the observation shows
        last, order, exits = env.wall()
        sentences.append(f"Follow the wall: {f'after {last}' if last else 'no move yet'}, try {', '.join(order)}; "
                         f"exits: {', '.join(exits)}.")
    sentences.append(f"Next: {env.actions[best]}.")
    return " ".join(sentences)


def household_detours(env: envs.Household) -> list[int]:
    """Admissible commands off the walkthrough that waste at least a step but do not lose the game,
    and still leave time to win within the horizon."""
    plan = env.walkthrough()
    steps_left = env.horizon - env.steps - EXPLORE_SLACK * env.explore  # the explorer's way can be longer
    detours = []
    for i, command in enumerate(env.actions):
        if command == plan[0]:
            continue
        after = env.walkthrough_after(i)
        if after is not None and len(after) >= len(plan) and 1 + len(after) <= steps_left:
            detours.append(i)
    return detours


# Each environment's teacher: reflection(env, best, rng, detour) -> text ending in "Next: <move>.",
# detours(env) -> the wrong but legal actions now, each leaving time to finish within the horizon,
# and follow(env, detour) -> a further wrong action right after a detour, or None (then the next
# step is the recovery); None in place of follow means never two detours in a row.
TEACHERS = {"taxi": (taxi_reflection, taxi_detours, None),
            "autoexplore": (explore_reflection, explore_detours, explore_follow),
            "household": (household_reflection, household_detours, None)}


def teacher_episode(env, task, seed: int, rng: random.Random, neg_prob: float, shuffle: bool,
                    asks: list | None = None, search: bool = False) -> dict | None:
    """One episode led by the oracle with occasional detours; returns its records of each kind. With
    `search` (autoexplore) the search teacher leads instead, without detours of its own making: None
    if it fails, or if it misses and neg_prob is 0 (the positive-only files). With
    `asks` (the LLM teacher), each reflection is a placeholder "\0<i>\0" for the endpoint's answer to
    asks[i]: the request, the Next: step it must name, and the template's reflection (the fallback)."""
    reflect, detours, follow = TEACHERS[env.name]
    records = {"reflection": [], "policy": [], "plain": []}
    obs = env.reset(task, seed)
    detour, mistake, done = None, None, False  # detour: the wrong move taken at the previous step, if any
    while not done:
        if search:
            best = env.scripted()
            reflection, detour = search_reflection(env, best)
            if detour and not neg_prob:
                return None
        else:
            best = env.oracle()
            reflection = reflect(env, best, rng, detour)  # drawn with the LLM teacher too: same rng, same episodes
        if asks is not None:
            want = reflection.rpartition("Next:")[2].strip()  # "move south." of "... Next: move south."
            asks.append((llm_request(obs, env.actions, best, want, mistake), want, reflection))
            reflection = f"\0{len(asks) - 1}\0"
        tags = {"stage": env.stage, "negative": detour is not None, "state": env.state}
        records["reflection"].append({"prompt": envs.analyze_prompt(obs), "completion": reflection, **tags})
        # the step after the last detour is the recovery, the negative example
        wrong = follow(env, detour) if detour is not None and follow else None
        if detour is None and not search and rng.random() < neg_prob:
            candidates = detours(env)
            wrong = rng.choice(candidates) if candidates else None
        if wrong is None:
            n = len(env.actions)
            labels = rng.sample(envs.LABELS[:n], n) if shuffle else envs.LABELS
            label = labels[best]
            for kind, text in (("policy", reflection), ("plain", None)):
                prompt = envs.policy_prompt(obs, env.actions, text, labels)
                records[kind].append({"prompt": prompt, "completion": label, **tags})
        detour_text = None if wrong is None else env.actions[wrong]
        before = (obs, env.actions[best])  # where a detour is taken, and what was best there
        reward, done, info = env.step(best if wrong is None else wrong)
        obs, detour = env.observation, detour_text
        mistake = None if detour is None else (detour, *before, reward)  # what the LLM teacher is told of it
    if search and not info["success"]:
        return None
    assert info["success"], f"teacher episode from task {task} failed: {info}"
    return records


def teacher_run(env_name: str, options: str, split: str, n_episodes: int, neg_prob: float, rng, shuffle: bool, bar,
                asks: list | None = None, search: bool = False) -> tuple[dict, int]:
    """n_episodes per curriculum stage, from the split's start tasks taken in turn; and how many of
    them the search teacher left out."""
    records, left_out = {"reflection": [], "policy": [], "plain": []}, 0
    for stage in envs.ENVS[env_name].stages:
        env = envs.make_env(env_name, stage, options=options)
        tasks = env.tasks(split)
        if not tasks:  # e.g. no deep targets among the validation repositories
            tqdm.write(f"{env_name} {stage}: no {split} tasks, skipped")
            bar.update(n_episodes)
            continue
        for i in range(n_episodes):
            episode = teacher_episode(env, tasks[i % len(tasks)], i, rng, neg_prob, shuffle, asks, search)
            left_out += episode is None
            for kind, recs in (episode or {}).items():
                records[kind] += recs
            bar.update(1)
    return records, left_out


def made_up_food_names(recs: list[dict], p: float, rng: random.Random) -> list[dict]:
    """The household records with the food of each cooking episode, by chance p, renamed in prompt and
    completion to one or two made-up words of two or three consonant-vowel syllables (`doma zotu`),
    the same name in every record of the episode (recipes of several foods are left alone; the games
    made here need one). The games are not changed. An episode begins at a record with no commands
    played or a change of food; in the policy and plain files an episode whose first step was a
    detour has no such record and takes the previous episode's draw (renamed or not) when the food
    does not say otherwise."""
    word = lambda: "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
    swap, out = None, []
    for r in recs:
        food = re.search(r"The cookbook's recipe needs: ([^,]+?)\.\n", r["prompt"])
        if not r["state"]["commands"] or (swap and (not food or food[1] != swap[0])):  # a new episode
            swap = (food[1], " ".join(word() for _ in range(rng.randint(1, 2)))) if food and rng.random() < p else None
        out.append(r | {k: r[k].replace(*swap) for k in ("prompt", "completion")} if swap else r)
    return out


# The LLM teacher (--teacher=llm). The episodes are played first, with placeholders for the
# reflections, so that the requests can then go out a few at a time; a request that several records
# share is asked once. An answer must end with the template's own Next: line (the policy's data and
# eval.py --check read it); one that names another step is asked again with the correction, then
# left for the template's reflection.
LLM_SYSTEM = ("You coach an agent that plays a text game: at each step it reads an observation and takes one "
              "of the admissible actions. You are told the best action. Write the agent's analysis of the "
              "situation, reasoned from the observation as if you had found the best action yourself: what "
              "matters, and after a mistake, what went wrong, what it cost and how to recover. At most four "
              "short sentences of plain text, then the last line exactly as given.")


class TeacherError(Exception):
    """The endpoint cannot write the reflections (unreachable, key refused, failing): the run stops."""


def llm_request(obs: str, actions: list[str], best: int, want: str, mistake: tuple | None) -> list[dict]:
    """The chat messages asking for one reflection, with what the paper gave GPT-4: the observation,
    the admissible actions, the best one, and after a detour the mistaken action, where it was taken,
    what was best there and its reward. The last line asked for is the template's, "Next: {want}"."""
    user = []
    if mistake:
        detour, before, best_then, reward = mistake
        user.append(f"Previous observation:\n{before}\n\nThere the agent made a mistake: it took '{detour}' "
                    f"instead of '{best_then}', got reward {reward:g}, and came to the observation below.")
    user += [f"Observation:\n{obs}", "Admissible actions:\n" + "\n".join(actions), f"Best action: {actions[best]}",
             f"Last line: Next: {want}"]
    return [{"role": "system", "content": LLM_SYSTEM}, {"role": "user", "content": "\n\n".join(user)}]


def llm_accept(answer: str, want: str) -> str | None:
    """The answer on one line, ending in "Next: {want}" written as the template writes it, or None
    when its last Next: names another step (case, a full stop, quotes and Markdown stars aside)."""
    body, sep, said = " ".join(answer.split()).rpartition("Next:")
    bare = lambda text: text.strip(" .*`'\"").lower()
    return f"{body.rstrip(' *')} Next: {want}".lstrip() if sep and bare(said) == bare(want) else None


def llm_client(base_url: str, timeout: float):
    """An OpenAI client; the package is imported here, so that only this teacher needs it."""
    try:
        import openai
    except ImportError:
        raise TeacherError("--teacher=llm needs the openai package: "
                           "pip install -r requirements-llm.txt -c constraints.txt") from None
    # local servers take any key, the package wants one; retries are done in llm_teach
    return openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "none", base_url=base_url or None,
                         timeout=timeout, max_retries=0)


def llm_teach(client, asks: list, model: str, cache: str, workers: int, retries: int, backoff: float):
    """The reflection for each of asks (request, Next: step, template), and the counts: records whose
    reflection the endpoint wrote at once ("accepted"), after a correction ("corrected"), or the
    template ("template"); and "requests" sent and answers read from the cache ("cached")."""
    import openai
    key, url = os.environ.get("OPENAI_API_KEY"), str(client.base_url)
    os.makedirs(cache, exist_ok=True)
    counts = Counter(dict.fromkeys(("accepted", "corrected", "template", "requests", "cached"), 0))
    lock = threading.Lock()

    def count(what: str):
        with lock:  # the workers count too
            counts[what] += 1

    def ask(messages: list[dict]) -> str:
        """The endpoint's answer from the cache, or from the endpoint and then cached."""
        request = {"model": model, "messages": messages}
        path = os.path.join(cache, hashlib.sha256(json.dumps([url, request]).encode()).hexdigest() + ".json")
        if os.path.exists(path):
            count("cached")
            with open(path) as f:
                return json.load(f)["answer"]
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))  # exponential back-off
            count("requests")
            try:
                # no text (a refusal, a filter) is an answer too: its Next: is wrong, so the template's stays
                answer = str(client.chat.completions.create(**request).choices[0].message.content or "")
                break
            except openai.APITimeoutError:
                problem = f"no answer within {client.timeout:g} s (--llm_timeout)"
            except openai.APIConnectionError:  # refused, or no such host
                raise TeacherError(f"cannot reach {url} (--llm_base_url or $OPENAI_BASE_URL): is the server up?") from None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise TeacherError(f"{url} refused the API key (HTTP {e.status_code}): "
                                   f"{'check' if key else 'set'} $OPENAI_API_KEY") from None
            except (openai.RateLimitError, openai.InternalServerError) as e:
                problem = f"HTTP {e.status_code}"
            except openai.APIStatusError as e:  # a 400 or a 404 (no such model): asking again will not help
                said = (e.message.replace(key, "***") if key else e.message).splitlines()[0][:200]
                raise TeacherError(f"{url} answered HTTP {e.status_code} for model '{model}': {said}") from None
            except (ValueError, AttributeError, IndexError, TypeError):  # not JSON, or not a chat completion
                problem = "a malformed answer"
        else:
            raise TeacherError(f"{url} failed {retries + 1} times in a row, last with {problem}")
        write_atomic(path, json.dumps({"answer": answer}) + "\n")
        return answer

    def write(messages: list[dict], want: str) -> tuple[str | None, str]:
        """A checked reflection (None: the template's) and how it came."""
        answer = ask(messages)
        if (text := llm_accept(answer, want)) is not None:
            return text, "accepted"
        fix = f"Your last line must be exactly: Next: {want} Please write the analysis again."
        text = llm_accept(ask(messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": fix}]),
                          want)
        return text, "template" if text is None else "corrected"

    shared = {}  # request -> the records that ask it
    for i, (messages, _, _) in enumerate(asks):
        shared.setdefault(json.dumps(messages), []).append(i)
    texts = [template for _, _, template in asks]
    pool = ThreadPoolExecutor(workers)
    jobs = {pool.submit(write, *asks[ids[0]][:2]): ids for ids in shared.values()}
    try:
        with tqdm(total=len(jobs), desc="llm reflections") as bar:
            for job in as_completed(jobs):
                text, how = job.result()  # a TeacherError stops here; the cache keeps what came
                for i in jobs[job]:
                    texts[i] = text or texts[i]
                    count(how)
                bar.update(1)
                bar.set_postfix(cached=counts["cached"], refresh=False)
    finally:
        pool.shutdown(cancel_futures=True)
    print(f"llm teacher, {model} at {url}: of {len(asks)} reflections {counts['accepted']} written at once, "
          f"{counts['corrected']} after a correction, {counts['template']} the template's (Next: named another "
          f"step); {counts['requests']} requests, {counts['cached']} answers from the cache")
    return texts, counts


def write_atomic(path: str, text: str):
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"  # same directory, so the rename stays on one file system
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def generate(env_name: str, out_dir: str, episodes: int, val_episodes: int, neg_prob: float, seed: int,
             shuffle_labels: bool = False, env_options: str = "", made_up_food: float = 0.0,
             teacher: str = "template", llm: dict | None = None, explore_teacher: str = "oracle") -> dict:
    """Write every data file to out_dir and return the metadata (also saved as meta.json).
    episodes=0 and neg_prob=-1 take the environment's defaults; `llm` overrides the llm_* defaults."""
    envs.make_env(env_name, options=env_options)  # fails early, with the list of names, on an unknown environment
    if env_name not in TEACHERS:
        raise ValueError(f"data_gen.py has no teacher for '{env_name}' yet")
    if explore_teacher not in ("oracle", "search"):
        raise ValueError(f"explore_teacher must be oracle or search, got '{explore_teacher}'")
    search = explore_teacher == "search"
    if search and (env_name != "autoexplore" or teacher != "template" or neg_prob != -1):
        raise ValueError("explore_teacher=search is AutoExplore's, writes its own analyses and takes no "
                         "detours: leave out teacher and neg_prob")
    episodes = episodes or ENV_DEFAULTS[env_name]["episodes"]
    neg_prob = 1.0 if search else ENV_DEFAULTS[env_name]["neg_prob"] if neg_prob == -1 else neg_prob
    if episodes < 1 or val_episodes < 1:
        raise ValueError("episodes and val_episodes must be at least 1")
    if not 0 <= neg_prob <= 1:
        raise ValueError(f"neg_prob must be in [0, 1], got {neg_prob}")
    if not 0 <= made_up_food <= 1:
        raise ValueError(f"made_up_food must be in [0, 1], got {made_up_food}")
    if made_up_food and env_name != "household":
        raise ValueError("made_up_food renames the food of household cooking games only")
    if teacher not in ("template", "llm"):
        raise ValueError(f"teacher must be template or llm, got '{teacher}'")
    llm = {k: globals()[k] for k in config_keys if k.startswith("llm_")} | (llm or {})
    if teacher == "llm" and not llm["llm_model"]:
        raise ValueError("--teacher=llm needs --llm_model=NAME, the endpoint's model (gpt-4o, llama3.1:8b, ...)")
    client = llm_client(llm["llm_base_url"], llm["llm_timeout"]) if teacher == "llm" else None
    asks = [] if client else None  # the LLM teacher's requests, filled in by teacher_episode
    for stage in envs.ENVS[env_name].stages:  # what the tasks need (household games) is made before the bar starts
        envs.make_env(env_name, stage, options=env_options).tasks("train")
    t0 = time.time()
    n_stages = len(envs.ENVS[env_name].stages)
    files, left_out = {}, {}
    with tqdm(total=2 * n_stages * (episodes + val_episodes), desc="teacher episodes") as bar:
        for split, n_episodes in (("train", episodes), ("val", val_episodes)):
            for suffix, p in (("", neg_prob), ("_pos", 0.0)):
                # one random stream per file group, named by string, so that changing one group's
                # settings never changes another group's data
                rng = random.Random(f"{seed}/{split}{suffix}")
                records, left_out[f"{split}{suffix}"] = teacher_run(env_name, env_options, split, n_episodes, p, rng,
                                                                     shuffle_labels, bar, asks, search)
                for kind, recs in records.items():
                    files[f"{kind}{suffix}_{split}.jsonl"] = recs
    if client:  # the endpoint's reflections in place of the placeholders
        cache = llm["llm_cache"] or os.path.join(out_dir, "llm_cache")
        texts, llm_counts = llm_teach(client, asks, llm["llm_model"], cache, llm["llm_workers"], llm["llm_retries"],
                                      llm["llm_backoff"])
        fill = lambda text: re.sub("\0([0-9]+)\0", lambda m: texts[int(m[1])], text)
        files = {name: [r | {k: fill(r[k]) for k in ("prompt", "completion")} for r in recs]
                 for name, recs in files.items()}
    if made_up_food:  # a stream per file, named by it (the seed already decides the episodes)
        files = {name: made_up_food_names(recs, made_up_food, random.Random(name)) for name, recs in files.items()}
    # everything is generated before anything is written, so a failure leaves old files whole
    os.makedirs(out_dir, exist_ok=True)
    for name, recs in files.items():
        write_atomic(os.path.join(out_dir, name), "".join(json.dumps(r) + "\n" for r in recs))
        print(f"{name}: {len(recs)} records, {sum(r['negative'] for r in recs)} negative")
    meta = {
        "config": {"env": env_name, "out_dir": out_dir, "episodes": episodes, "val_episodes": val_episodes,
                   "neg_prob": neg_prob, "shuffle_labels": shuffle_labels, "seed": seed,
                   "env_options": env_options, "made_up_food": made_up_food,
                   "explore_teacher": explore_teacher, "teacher": teacher,
                   **(llm if client else {})},
        "stages": list(envs.ENVS[env_name].stages),
        "horizon": envs.make_env(env_name, options=env_options).horizon,
        "counts": {name: len(recs) for name, recs in files.items()},
        "negative_counts": {name: sum(r["negative"] for r in recs) for name, recs in files.items()},
        "episodes_left_out": left_out,  # by the search teacher: failed, or (_pos) with a miss
        "seconds": round(time.time() - t0, 2),
    }
    if client:
        meta["llm"] = {"endpoint": str(client.base_url), **llm_counts}
    write_atomic(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
    return meta


def parse_overrides(argv: list[str], defaults: dict) -> dict:
    """defaults updated by --key=value arguments, each converted to the type of its default."""
    config = dict(defaults)
    for arg in argv:
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"bad argument '{arg}': use --key=value")
        if key not in config:
            raise ValueError(f"unknown option --{key} (known: {', '.join(defaults)})")
        kind = type(defaults[key])
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key} wants true or false, got '{text}'")
            config[key] = text.lower() in ("true", "1")
        else:
            try:
                config[key] = kind(text)
            except ValueError:
                wanted = "an integer" if kind is int else "a number" if kind is float else "a string"
                raise ValueError(f"--{key} wants {wanted}, got '{text}'") from None
    return config


if __name__ == "__main__":
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print(__doc__.strip() + "\n\n" + open(__file__).read().split("# " + "-" * 94)[1].strip())
        sys.exit(0)
    try:
        cfg = parse_overrides(sys.argv[1:], {k: globals()[k] for k in config_keys})
        generate(cfg["env"], cfg["out_dir"] or os.path.join("data", cfg["env"]), cfg["episodes"],
                 cfg["val_episodes"], cfg["neg_prob"], cfg["seed"], cfg["shuffle_labels"], cfg["env_options"],
                 cfg["made_up_food"], cfg["teacher"], {k: v for k, v in cfg.items() if k.startswith("llm_")},
                 cfg["explore_teacher"])
    except (ValueError, TeacherError) as e:
        print(f"data_gen.py: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)
