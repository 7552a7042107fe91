"""
Evaluation: checkpoints and the baselines (random, oracle, and on AutoExplore a scripted agent) on
the held-out test tasks of every curriculum stage, as the paper's table (success rate with a 95%
Wilson interval, mean return, dangerous-termination rate, mean steps), printed as Markdown and
written to {out_dir}/eval.json.

    python eval.py                                  # the standard comparison, whatever is trained
    python eval.py --methods="mine=out/taxi/rl+out/taxi/sft_reflection" --stages=full --greedy
    python eval.py --plot                           # only the learning curves of the RL runs -> curves.png
    python eval.py --check                          # only: do the reflection model and the policy agree with the teacher?
    python eval.py --transcripts                    # also every episode, step by step -> transcripts.jsonl

A method is `name=policy_dir` (the policy reads the observation alone),
`name=policy_dir+reflection_dir` (a frozen reflection model writes an analysis first, as in
Reflect-RL), or `name=+reflection_dir` (no policy: the action whose text is the analysis's `Next:`
step, a random one when none is; what a policy that follows the analysis exactly would do).
Episode k of a stage starts from test task k % len(tasks) with seed k, so every method meets the
same tasks in the same order; eval.json keeps each method's win or loss per episode ("wins"), to
see which test tasks (make_env(env, stage).tasks("test")) a method fails.
"""
import glob
import json
import math
import os
import random
import sys
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from envs import ENVS, LABELS, MENU_HEAD, analyze_prompt, make_env, parse_menu, policy_prompt
from model import EOS, SMOLLM2, GPT, label_token_ids, load_checkpoint, pick_device, pretrained_tokenizer

# ----------------------------------------------------------------------------- config
env = "taxi"  # environment to evaluate on (see envs.ENVS)
env_options = ""  # the environment's own settings, "key=value,..." (see envs.make_env)
out_dir = ""  # "" means out/{env}; the standard methods are looked for here, eval.json goes here
episodes = 500  # per stage and method, cycling through the test tasks
stages = ""  # "" means every curriculum stage of the env, else a comma list
methods = ""  # comma list of name=policy_dir[+reflection_dir]; "" means the standard comparison
batch_size = 64  # episodes run side by side: one generate and one score_actions call per step
greedy = False  # False: sample the action from the policy, as PPO trains it; True: argmax
untuned = ""  # a pretrained model (smollm2-135m, gpt2, a directory) to add untuned, as the paper's
              # "untuned model" row: no fine-tuning, the menu under an instruction, the label's log-prob
reflection_temperature = 0.7
reflection_max_tokens = 96
seed = 0  # seeds torch, random, numpy and the sampling generator
device = ""  # "" picks cuda, then mps, then cpu
plot = False  # instead of evaluating, draw success vs env steps of every RL run in {out_dir}/*/log.jsonl
transcripts = False  # also write every episode to {out_dir}/transcripts.jsonl, one line per method, stage
                     # and episode: each step's observation, analysis, action, the oracle's action, reward
check = False  # instead of evaluating, score each reflection model's "Next:" step and each policy's
               # choice against the teacher's on data/{env}/*_val.jsonl (--episodes records per stage)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()  # lower-case names only: not the imported LABELS and EOS
               if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))]

# the paper's comparison: (name, policy dir, reflection dir or None), relative to out_dir
STANDARD = (("SFT", "sft_policy", "sft_reflection"),
            ("SFT (no reflection)", "sft_plain", None),
            ("SFT+RL (no reflection)", "rl_plain", None),
            ("Reflect-RL", "rl", "sft_reflection"),
            ("Reflect-RL (no negatives)", "rl_pos", "sft_reflection_pos"))


def parse_args(argv):
    """--key=value overrides of the defaults above, type-checked; --flag alone means True; --help
    prints the docstring and the config block."""
    for arg in argv:
        if arg in ("-h", "--help"):
            block = open(__file__).read().split("# " + "-" * 77)[1].removeprefix(" config")
            print(f"{__doc__.strip()}\n\noptions, each --key=value (the defaults):{block.rstrip()}")
            raise SystemExit(0)
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in config_keys:
            raise SystemExit(f"error: unknown option {arg} (known: {', '.join('--' + k for k in config_keys)})")
        old = globals()[key]
        try:
            if isinstance(old, bool):
                val = {"true": True, "1": True, "false": False, "0": False}[val.lower() if eq else "true"]
            else:
                val = type(old)(val)
        except (KeyError, ValueError):
            raise SystemExit(f"error: --{key} wants a {type(old).__name__}, got {val!r}")
        globals()[key] = val


def wilson(successes, n, z=1.959964):
    """95% Wilson score interval of a binomial proportion; unlike p +- z*se it stays inside [0, 1]
    and is not empty at 0 or n successes."""
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 or n successes the bound is exactly 0 or 1; floating point would leave ~1e-17 either side
    return (0.0 if successes == 0 else center - half), (1.0 if successes == n else center + half)


def method_specs():
    """(name, policy_dir, reflection_dir or None) of each method to load. Standard methods that are
    not trained yet are skipped with a note; a method named on the command line must load."""
    if not methods:
        specs = []
        for name, pol, refl in STANDARD:
            dirs = [os.path.join(out_dir, d) for d in (pol, refl) if d]
            missing = [d for d in dirs if not os.path.isfile(os.path.join(d, "ckpt.pt"))]
            if missing:
                print(f"skipping {name}: no checkpoint at {os.path.join(missing[0], 'ckpt.pt')}")
            else:
                specs.append((name, dirs[0], dirs[1] if refl else None))
        return specs
    specs = []
    for item in methods.split(","):
        name, eq, dirs = item.partition("=")
        pol, _, refl = dirs.partition("+")
        if not (eq and name.strip() and (pol or refl)):
            raise SystemExit(f"error: --methods wants name=policy_dir[+reflection_dir] or name=+reflection_dir, got {item!r}")
        specs.append((name.strip(), pol, refl or None))
    names = [n for n, _, _ in specs] + ["Random", "Scripted", "Oracle", "Untuned"]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: --methods names a method twice (Random, Scripted, Oracle and Untuned are taken): {methods!r}")
    return specs


def load_agent(name, policy_dir, reflection_dir, cache):
    """A method as a dict: the policy (model, tokenizer, label ids) and the reflection (model,
    tokenizer) or None; without a policy, kind "follow" and the reflection alone. Models are loaded
    once, however many methods share them."""
    def load(path):
        if path not in cache:
            model, tok, _ = load_checkpoint(path, dev)
            cache[path] = (model.eval(), tok)
        return cache[path]

    reflection = load(reflection_dir) if reflection_dir else None
    if reflection and reflection[0].config.block_size <= reflection_max_tokens:
        raise ValueError(f"{reflection_dir}: block_size {reflection[0].config.block_size} leaves no room "
                         f"for a prompt before {reflection_max_tokens} reflection tokens")
    if not policy_dir:
        return {"name": name, "kind": "follow", "reflection": reflection}
    policy, tok = load(policy_dir)
    labels = torch.tensor(label_token_ids(tok, LABELS), device=dev)  # start-up check: labels are one token
    share = bool(reflection) and policy.shares_trunk(reflection[0])  # two adapters on one base
    return {"name": name, "kind": "model", "policy": (policy, tok, labels), "reflection": reflection, "share": share}


INSTRUCTION = ("You are an agent in a text environment. Read the observation and the actions, each with its "
               "label in brackets, then answer with the label of the best action, and nothing else.")


def load_untuned(name):
    """The paper's untuned baseline: a pretrained model as it is, reading the no-reflection prompt under
    an instruction (in the chat format of an instruction-tuned SmolLM2), scored by its label log-probs."""
    model = GPT.from_pretrained(name).to(dev).eval()
    tok = pretrained_tokenizer(name)
    if name == SMOLLM2:  # ChatML, as SmolLM2-Instruct was tuned on; the answer starts the assistant turn
        wrap = lambda text: (f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n"  # noqa: E731
                             f"{text.removesuffix(' # Action:' + chr(10)).rstrip()}<|im_end|>\n<|im_start|>assistant\n")
    else:
        wrap = lambda text: f"{INSTRUCTION}\n\n{text}"  # noqa: E731
    labels = torch.tensor(label_token_ids(tok, LABELS), device=dev)
    return {"name": "Untuned", "kind": "model", "policy": (model, tok, labels), "reflection": None, "wrap": wrap}


def reflect(reflection, texts, g, keep=0):
    """Sampled analyses of prompts that end with the Analyze header, in one batched KV-cache call
    (and with keep > 0 the state of the first `keep` blocks, for the policy's extend_trunk)."""
    model, tok = reflection
    room = model.config.block_size - reflection_max_tokens  # the new tokens need positions too
    prompts = [tok.encode(t, add_special_tokens=False).ids[-room:] for t in texts]
    outs = model.generate(prompts, reflection_max_tokens, temperature=reflection_temperature,
                          stop=[tok.token_to_id(EOS)], generator=g, keep=keep)
    outs, kept = outs if keep else (outs, None)
    texts = [tok.decode(ids).strip() for ids in outs]
    return (texts, kept) if keep else texts


@torch.no_grad()
def act(agent, batch, g):
    """One action index for each env in `batch`, all of them live, and the analysis each action
    followed (None where the method writes none)."""
    reflections = [None] * len(batch)  # None: the policy prompt has no analysis section
    if agent["kind"] == "random":
        return [int(torch.randint(len(e.actions), (), generator=g, device=g.device)) for e in batch], reflections
    if agent["kind"] == "oracle":
        return [e.oracle() for e in batch], reflections
    if agent["kind"] == "scripted":
        return [e.scripted() for e in batch], reflections
    kept = None
    if agent["reflection"] and agent.get("share"):  # the policy's frozen blocks go on from the reflection's state
        reflections, kept = reflect(agent["reflection"], [analyze_prompt(e.observation) for e in batch], g,
                                    agent["policy"][0].frozen_blocks())
    elif agent["reflection"]:
        # an empty analysis stays a string: the prompt keeps the Analyze header the policy trained with
        reflections = reflect(agent["reflection"], [analyze_prompt(e.observation) for e in batch], g)
    if agent["kind"] == "follow":
        named = [next_step(r).removesuffix(".") for r in reflections]
        return [e.actions.index(n) if n in e.actions else int(torch.randint(len(e.actions), (), generator=g, device=g.device))
                for e, n in zip(batch, named)], reflections
    model, tok, labels = agent["policy"]
    wrap = agent.get("wrap", lambda text: text)
    prompts = [tok.encode(wrap(policy_prompt(e.observation, e.actions, r, LABELS)), add_special_tokens=False).ids
               [-model.config.block_size:] for e, r in zip(batch, reflections)]  # left-truncate: keep the question
    B, T, A = len(batch), max(len(p) for p in prompts), max(len(e.actions) for e in batch)
    idx = torch.zeros(B, T, dtype=torch.long)  # right padding: causal attention never lets it reach a real token
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)  # (B,)
    label_ids = labels[:A].expand(B, A)  # (B, A): action j has label LABELS[j] in every prompt
    action_mask = torch.arange(A, device=dev) < torch.tensor([len(e.actions) for e in batch], device=dev)[:, None]
    trunk = model.extend_trunk(prompts, kept) if kept else None
    logp, _ = model.score_actions(idx.to(dev), lengths, label_ids, action_mask, trunk=trunk)  # (B, A), -inf where masked
    choice = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=g).squeeze(-1)
    return choice.tolist(), reflections


def run_episodes(agent, stage, tasks, g):
    """Per-episode results of `episodes` episodes, `batch_size` at a time (with --transcripts, each
    with its steps)."""
    results = []
    bar = tqdm(total=episodes, desc=f"{agent['name']} / {stage}", leave=False)
    for lo in range(0, episodes, batch_size):
        ks = range(lo, min(lo + batch_size, episodes))
        batch = [make_env(env, stage, options=env_options) for _ in ks]
        for k, e in zip(ks, batch):
            e.reset(tasks[k % len(tasks)], seed=k)
        ret, steps, info = [0.0] * len(batch), [0] * len(batch), [None] * len(batch)
        said = [[] for _ in batch]  # with --transcripts: each episode's steps
        live = list(range(len(batch)))
        while live:
            ended = set()
            choices, analyses = act(agent, [batch[i] for i in live], g)
            for i, a, analysis in zip(live, choices, analyses):
                if transcripts:
                    said[i].append({"observation": batch[i].observation, "analysis": analysis,
                                    "action": batch[i].actions[a], "oracle": batch[i].actions[batch[i].oracle()]})
                r, done, info[i] = batch[i].step(a)
                ret[i], steps[i] = ret[i] + r, steps[i] + 1
                if transcripts:
                    said[i][-1]["reward"] = r
                if done:
                    ended.add(i)
            live = [i for i in live if i not in ended]
        results += [{"success": bool(info[i]["success"]), "return": ret[i], "dangerous": bool(info[i]["dangerous"]),
                     "steps": steps[i], "transcript": said[i]} for i in range(len(batch))]
        bar.update(len(batch))
    bar.close()
    return results


def summarize(name, results):
    n = len(results)
    wins = sum(r["success"] for r in results)
    lo, hi = wilson(wins, n)
    return {"method": name, "success": wins / n, "ci_low": lo, "ci_high": hi,
            "return": sum(r["return"] for r in results) / n,
            "dangerous": sum(r["dangerous"] for r in results) / n,
            "steps": sum(r["steps"] for r in results) / n, "episodes": n}


def markdown(rows):
    lines = ["| method | success [95% CI] | return | dangerous | steps | episodes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['success']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['return']:.3f} | {r['dangerous']:.3f} | {r['steps']:.2f} | {r['episodes']} |")
    return "\n".join(lines)


def next_step(text):
    """The move a reflection recommends: what follows its last "Next:" (all of it if there is none)."""
    return text.rpartition("Next:")[2].strip()


def read_val(path, stages):
    """Validation records of data_gen.py, grouped by stage (only `stages`)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no validation data at {path}: run python data_gen.py --env={env} first")
    by_stage = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                if {"prompt", "completion", "negative", "stage"} - r.keys():
                    raise KeyError
                if r["stage"] in stages:
                    by_stage.setdefault(r["stage"], []).append(r)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise SystemExit(f"error: {path}:{i} is not a data_gen.py record; regenerate it with data_gen.py")
    if not by_stage:
        raise SystemExit(f"error: {path} has no records of the stages {', '.join(stages)}")
    return {stage: random.Random(seed).sample(recs, min(episodes, len(recs))) for stage, recs in by_stage.items()}


def report_rows(stage, hits, recs, taught):
    """Agreement rows: all records, those right after a detour, and the teacher's 8 most frequent
    answers (taught[i] is the teacher's answer in recs[i]). An answer in under 5% of the records
    joins the others of its first word ("cat <other>"), so that moves that name files or objects
    are still counted by kind."""
    counts = Counter(taught)
    taught = [t if counts[t] >= 0.05 * len(taught) or not t.split() else f"{t.split()[0]} <other>" for t in taught]
    groups = {"(all)": range(len(recs)), "(after a detour)": [i for i, r in enumerate(recs) if r["negative"]]}
    for want, _ in Counter(taught).most_common(8):
        groups[want] = [i for i, t in enumerate(taught) if t == want]
    rows = []
    for name, idx in groups.items():
        agree = sum(hits[i] for i in idx)
        rows.append({"teacher": name, "records": len(idx), "agree": agree / max(1, len(idx))})
        print(f"| {stage} | {len(idx)} | {name} | {agree}/{len(idx)} |")
    return rows


@torch.no_grad()
def check_models(specs, data, g):
    """Each player against the teacher on the validation records (held-out tasks), per stage, overall,
    after a detour and per frequent teacher answer. The reflection model samples its analysis as in
    the agent and must name the teacher's next step; the policy reads the teacher's analysis (none
    without reflection) and its most probable action must be the teacher's. Shows which of the two
    players fails before blaming either."""
    if not specs:
        raise SystemExit("error: no model to check: train one with sft.py or name it in --methods")
    refl_dirs = sorted({r for _, _, r in specs if r})
    pol_dirs = sorted({(p, bool(r)) for _, p, r in specs if p})
    report = {"reflection": {}, "policy": {}}
    head = "| stage | records | teacher says | agree |\n| --- | --- | --- | --- |"
    if refl_dirs:
        recs_by_stage = read_val(os.path.join(data, "reflection_val.jsonl"), stage_list)
    for d in refl_dirs:
        model, tok, _ = load_checkpoint(d, dev)
        model.eval()
        print(f"\n## reflection {d}: the sampled Next: step equals the teacher's\n{head}")
        for stage, recs in recs_by_stage.items():
            said = []
            for lo in tqdm(range(0, len(recs), batch_size), desc=f"{d} / {stage}", leave=False):
                said += map(next_step, reflect((model, tok), [r["prompt"] for r in recs[lo:lo + batch_size]], g))
            taught = [next_step(r["completion"]) for r in recs]
            report["reflection"].setdefault(d, {})[stage] = report_rows(stage, [s == t for s, t in zip(said, taught)], recs, taught)
    for d, with_reflection in pol_dirs:
        model, tok, _ = load_checkpoint(d, dev)
        model.eval()

        def top_label(prompt):
            labels = parse_menu(prompt)[0]
            ids = tok.encode(prompt, add_special_tokens=False).ids[-model.config.block_size:]
            label_ids = torch.tensor([label_token_ids(tok, labels)], device=dev)
            logp, _ = model.score_actions(torch.tensor([ids], device=dev), torch.tensor([len(ids)], device=dev),
                                          label_ids, torch.ones_like(label_ids, dtype=torch.bool))
            return labels[int(logp.argmax())]

        kind = "policy" if with_reflection else "plain"
        print(f"\n## policy {d}, on {kind}_val.jsonl: its most probable action is the teacher's\n{head}")
        picked = Counter()  # the labels it puts first: a policy that reads nothing shows one label
        below = {"0-3": [], "4-7": [], "8-15": [], "16+": []}  # hits by the menu lines under the teacher's
        # controls: the same records with the analysis left out (what the state alone gives), and with
        # the menu's lines in a random order (what the sorted order gives); a reader loses nothing to the second
        controls, rng = {"analysis left out": [], "lines shuffled": []}, random.Random(seed)
        for stage, recs in read_val(os.path.join(data, f"{kind}_val.jsonl"), stage_list).items():
            hits, taught = [], []
            for r in recs:  # one at a time: the menu, and so the label tokens, differ between records
                labels, actions = parse_menu(r["prompt"])
                first = top_label(r["prompt"])
                hits.append(first == r["completion"])
                taught.append(actions[labels.index(r["completion"])])
                picked[first] += 1
                n_below = len(labels) - 1 - labels.index(r["completion"])
                below["0-3" if n_below < 4 else "4-7" if n_below < 8 else "8-15" if n_below < 16 else "16+"].append(hits[-1])
                head_text = r["prompt"].rpartition(MENU_HEAD)[0].removesuffix("\n")
                if with_reflection:
                    bare = policy_prompt(head_text.rpartition(analyze_prompt(""))[0], actions, "", labels)
                    controls["analysis left out"].append(top_label(bare) == r["completion"])
                order = rng.sample(range(len(actions)), len(actions))
                moved = policy_prompt(head_text, [actions[i] for i in order], None, labels)
                controls["lines shuffled"].append(top_label(moved) == labels[order.index(labels.index(r["completion"]))])
            report["policy"].setdefault(d, {})[stage] = report_rows(stage, hits, recs, taught)
        label, n = picked.most_common(1)[0]
        report["policy"][d]["favourite_label"] = {"label": label, "records": n, "of": picked.total()}
        print(f"its favourite label: {label}, first in {n} of {picked.total()} records")
        report["policy"][d]["by_lines_below"] = {k: {"records": len(v), "agree": sum(v)} for k, v in below.items()}
        print("by the number of menu lines below the teacher's action (all stages): " +
              ", ".join(f"{k}: {sum(v)}/{len(v)}" for k, v in below.items()))
        report["policy"][d]["controls"] = {k: {"records": len(v), "agree": sum(v)} for k, v in controls.items() if v}
        print("the same records (all stages) " + ", ".join(f"with the {k}: {sum(v)}/{len(v)}"
                                                          for k, v in controls.items() if v))
    out = os.path.join(out_dir, "check.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"\nwrote {out}")


def plot_curves(directory):
    """Success vs env steps (iterations where a log has none) of every RL run in directory/*/log.jsonl,
    with the curriculum's stage changes marked; saved as directory/curves.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib")
    runs = {}
    for path in sorted(glob.glob(os.path.join(directory, "*", "log.jsonl"))):
        records = []
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # the last line of a run that is still writing may be cut short
                if isinstance(r, dict) and "iter" in r and "success" in r:  # RL iterations only
                    records.append(r)
        if records:
            runs[os.path.basename(os.path.dirname(path))] = records
    if not runs:
        print(f"--plot: no RL log (records with 'iter' and 'success') in {directory}/*/log.jsonl, nothing to draw")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, records in runs.items():
        x = [r.get("env_steps", r["iter"]) for r in records]
        (line,) = ax.plot(x, [r["success"] for r in records], label=name)
        for prev, r, xi in zip(records, records[1:], x[1:]):
            if r.get("stage") != prev.get("stage"):
                ax.axvline(xi, color=line.get_color(), linestyle=":", alpha=0.7)
                ax.text(xi, 0.02, f" {r.get('stage')}", rotation=90, color=line.get_color(), fontsize=8,
                        transform=ax.get_xaxis_transform())
    every_steps = all("env_steps" in r for records in runs.values() for r in records)
    ax.set(xlabel="env steps" if every_steps else "env steps (iteration where not logged)",
           ylabel="success rate", ylim=(-0.02, 1.02), title=f"{env}: RL learning curves")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(directory, "curves.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    parse_args(sys.argv[1:])
    if env not in ENVS:
        raise SystemExit(f"error: unknown environment {env!r}: choose from {', '.join(ENVS)}")
    all_stages = ENVS[env].stages
    stage_list = stages.split(",") if stages else list(all_stages)
    for s in stage_list:
        if s not in all_stages:
            raise SystemExit(f"error: unknown stage {s!r} for {env}: choose from {', '.join(all_stages)}")
    try:
        make_env(env, options=env_options)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if episodes < 1 or batch_size < 1 or reflection_max_tokens < 1:
        raise SystemExit("error: --episodes, --batch_size and --reflection_max_tokens must be at least 1")
    out_dir = out_dir or os.path.join("out", env)
    if plot:
        plot_curves(out_dir)
        sys.exit(0)
    dev = device or pick_device()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    specs, cache = method_specs(), {}
    if check:
        try:
            check_models(specs, os.path.join("data", env), torch.Generator(device=dev).manual_seed(seed))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        sys.exit(0)
    try:
        agents = [load_agent(*spec, cache) for spec in specs] + ([load_untuned(untuned)] if untuned else [])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    agents = [{"name": "Random", "kind": "random"}] + agents + [{"name": "Oracle", "kind": "oracle"}]
    if hasattr(ENVS[env], "scripted"):  # AutoExplore: what matching the question's text alone does
        agents.insert(1, {"name": "Scripted", "kind": "scripted"})
    methods = ",".join(f"{n}={p}" + (f"+{r}" if r else "") for n, p, r in specs)  # saved resolved
    report = {"env": env, "config": {k: globals()[k] for k in config_keys}, "stages": {}}
    os.makedirs(out_dir, exist_ok=True)
    if transcripts:
        open(os.path.join(out_dir, "transcripts.jsonl"), "w").close()
    for stage in stage_list:
        tasks = make_env(env, stage, options=env_options).tasks("test")
        if not tasks:
            raise SystemExit(f"error: {env} / {stage} has no test tasks")
        print(f"\n## {env} / {stage}: {len(tasks)} distinct test tasks, {episodes} episodes per method")
        # a fresh generator per (method, stage): a method's numbers do not depend on what else runs
        runs = {a["name"]: run_episodes(a, stage, tasks, torch.Generator(device=dev).manual_seed(seed)) for a in agents}
        rows = [summarize(name, results) for name, results in runs.items()]
        print(markdown(rows))
        report["stages"][stage] = {"test_tasks": len(tasks), "results": rows,
                                   "wins": {name: [int(r["success"]) for r in results] for name, results in runs.items()}}
        path = os.path.join(out_dir, "eval.json")  # rewritten after every stage, atomically
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
        if transcripts:  # appended stage by stage, like eval.json's stages
            with open(os.path.join(out_dir, "transcripts.jsonl"), "a") as f:
                for name, results in runs.items():
                    for k, r in enumerate(results):
                        f.write(json.dumps({"method": name, "stage": stage, "episode": k, "task": tasks[k % len(tasks)],
                                            "success": r["success"], "steps": r["transcript"]}, default=str) + "\n")
    print(f"\nwrote {os.path.join(out_dir, 'eval.json')}" + (" and transcripts.jsonl" if transcripts else ""))
