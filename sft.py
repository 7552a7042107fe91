"""
Supervised fine-tuning (the warm-up of Reflect-RL): completion-only loss on the JSONL records
that data_gen.py writes ({"prompt": ..., "completion": ...}).

    python sft.py                                   # default data if missing, then reflection, policy, plain
    python sft.py --negatives=False                 # the ablation: positive-only reflection and policy
    python sft.py --init_from=smollm2-135m           # LoRA on a pretrained model (the PRETRAINED recipe)
    python sft.py --env=household --init_from=scratch  # the household games' small GPT-2 from scratch
    python sft.py --role=policy --init_from=gpt2-xl --device=cuda
    torchrun --nproc_per_node=4 sft.py ...          # data parallel (gloo on CPU, NCCL on GPU)

Roles: `reflection` (prompt up to " # Analyze:" -> reflection), `policy` (prompt with reflection ->
action label) and `plain` (prompt without reflection -> label, the no-reflection baseline).
Each role trains its own model into {out_dir}/sft_{role}[_pos]/ (ckpt.pt, tokenizer.json, log.jsonl).
"""
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from envs import ENVS, LABELS, MENU_HEAD, analyze_prompt, parse_menu, policy_prompt
from model import EOS, GPT, GPTConfig, label_token_ids, load_checkpoint, pick_device, pretrained_tokenizer, \
    restore_rng, rng_states, save_checkpoint, train_tokenizer

# ----------------------------------------------------------------------------- config
env = "taxi"  # environment whose data to train on (see envs.ENVS)
data_dir = ""  # JSONL from data_gen.py; "" means data/{env} (generated if missing)
out_dir = ""  # "" means out/{env}
role = "all"  # reflection | policy | plain | all (reflection, policy and plain in turn)
negatives = True  # False: train on the positive-only data (the ablation), into sft_{role}_pos
init_from = ""  # scratch | resume | smollm2-135m | gpt2 ... gpt2-xl | a local HF directory; "" means the
               # environment's default in INIT_FROM; resume continues each role's checkpoint with its
               # saved options, except those given here
policy_init = ""  # with scratch, where the policy and plain models start: "reflection" (the weights of
                  # the trained sft_reflection[_pos], a stand-in for pretraining) or "scratch" (random);
                  # "" means the environment's default in POLICY_INIT
# model (scratch only; a pretrained GPT-2 brings its own shape)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 0  # 0 means the environment's context size, envs.ENVS[env].context
vocab_size = 2048  # of the byte-level BPE trained on the data, for scratch
dropout = 0.0
# LoRA (0 = full fine-tuning; the default for scratch, where there is no base worth keeping; a
# pretrained start takes the PRETRAINED values below for the options not given)
lora_r = 0
lora_alpha = 16.0
lora_targets = "all"  # the matrices with adapters (model.py's docstring names them), or all
lora_layers = 0  # adapters on the top this many blocks only (the frozen ones below need no backward); 0: all
# optimisation
max_iters = 0  # per role; 0 means the environment's default for the role in ROLE_ITERS
batch_size = 32
bucket = 0  # draw bucket * batch_size records, train on a batch of them of similar length (less
            # padding); 1 draws the batch directly; 0 means the environment's default in BUCKET
learning_rate = 2e-3  # peak, after warm-up; cosine decay to a tenth
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0
lm_loss = -1.0  # weight of an added next-token loss on every token, the prompt's too (a stand-in for
                # the reading and copying that pretraining brings); 0 is the completion-only loss, a
                # negative value the environment's default in LM_LOSS. The logged train loss includes
                # it; the validation loss and accuracy do not
shuffle_labels = -1  # policy and plain: 1 permutes the menu labels of a record anew at every draw,
                     # so that the label can only be found by reading the menu; 0 keeps the data's
                     # labels; -1 means the environment's default in SHUFFLE_LABELS
shuffle_lines = -1  # policy and plain: 1 puts the menu's lines in a fresh random order at every draw
                    # (labels then follow shuffle_labels: permuted, or 0, 1, ... down the menu), so
                    # that the teacher's command is anywhere in the menu; -1 means the environment's
                    # default in SHUFFLE_LINES
swap_prob = -1.0  # policy: the probability that a drawn record's analysis names another command of its
                  # menu as its `Next:` step, which becomes the target, so that the policy must read
                  # the analysis; -1 means the environment's default in SWAP_PROB
sampled_prob = 0.0  # policy: the probability that a drawn record's analysis is one sampled from the
                    # trained reflection model (sft_reflection[_pos] in out_dir, temperature 0.7, once per
                    # record before training) instead of the teacher's, so that the policy also meets
                    # the analyses it will see in play, mistakes included; the target stays the teacher's
rename = -1  # 1 renames the objects of a household game at every draw (each takes the name of a random
            # object of the same TextWorld type from the training games, in prompt and completion),
            # so that names must be read and copied, not remembered; 0 keeps them; -1 means the
            # environment's default in RENAME. ALFWorld's games keep their names
copy_warmup = 0  # scratch: iterations of a copying task before SFT (a span of random tokens repeated,
                 # next-token loss), meant as a stand-in for the copying that pretraining brings; it
                 # made both reflection models worse (docs/autoexplore.md); 0 skips it
eval_interval = 250  # validation loss and a checkpoint every this many iterations
eval_batches = 8
seed = 1337
device = ""  # "" picks cuda, then mps, then cpu
dtype = "float32"  # float32 | bfloat16 (autocast, on cuda)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()  # lower-case names only: not the imported LABELS and EOS
               if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# Iterations per role, from measurements (docs/). Taxi: the reflection model and the plain
# policy must read the map (the reflection named a non-shortest move in 5% of states after 600
# iterations, 0.4% after 1500); the policy with reflection copies the analysis's last sentence (99%
# after 250). AutoExplore: the plain policy overfitted past ~250; the policy with reflection still
# learned at 1000 (the teacher's action first in 114 of 191 validation states, 53 after 250); the
# reflection's 1200 is a compromise with time (2400 did not help on the current data). Household:
# without SHUFFLE_LABELS the policies overfit after ~500; with it they keep learning the menu
# look-up: validation label accuracy 0.67 after 3000 iterations (plain 0.41), 0.80 after 6000 (plain
# 0.61), and Reflect-RL 61.7% on `full` instead of 42.2% (docs/household.md).
ROLE_ITERS = {"taxi": {"reflection": 1200, "policy": 300, "plain": 1200},
              "autoexplore": {"reflection": 1200, "policy": 1000, "plain": 300},
              "household": {"reflection": 1200, "policy": 6000, "plain": 6000}}
# A policy from scratch on the household games never learned to find the reflection's command in the
# menu: with the teacher's reflection its most probable action was the teacher's in 27% of validation
# states after 1000 iterations, below the plain policy's 36%. Started from the reflection model, which
# has learned to read and copy the games' text, it reaches 45% after 500 (166 of 368), the plain
# policy started the same way 42% (153), by python eval.py --env=household --check (300 games per
# stage; with the default 600, 171 of 356 and 157). On AutoExplore the same start did worse (28 of
# 127 depth-1 and 125 of 300 deeper states, against 42 and 262 from scratch).
POLICY_INIT = {"taxi": "scratch", "autoexplore": "scratch", "household": "reflection"}
BUCKET = {"taxi": 1, "autoexplore": 8, "household": 8}  # taxi prompts all have about the same length
# On the household games the added next-token loss (lm_loss=1) lowered the reflection model's validation
# loss from 0.526 to 0.442 (0.631 to 0.552 without negatives). With the reflection models unchanged it
# raised the policies' label accuracy at 500 iterations from 0.488 to 0.535 (policy) and from 0.438 to
# 0.492 (plain); started from reflection models trained with it, they reached 0.457 and 0.465 (8
# validation batches: noisy). It lifted Reflect-RL on the test games on every stage (docs/household.md).
# On AutoExplore it made the policy agree less often with the teacher's step (docs/autoexplore.md).
LM_LOSS = {"taxi": 0.0, "autoexplore": 0.0, "household": 1.0}
# Household menus run to 51 lines and the label of a command changes from game to game; trained on the
# data's labels the policy learned which label each training game wants, not how to find the analysis's
# command in the menu. Permuted labels lifted Reflect-RL from 85.6 / 75.0 / 33.3% to 92.8 / 85.0 /
# 43.9% on the test games (docs/household.md).
SHUFFLE_LABELS = {"taxi": 0, "autoexplore": 0, "household": 1}
# In the sorted household menus the teacher's command is one of the last four lines in 247 of the 356
# validation records, and the policy finds it best there: given the teacher's analysis it picks it in 188
# of 247 validation states where it is among the last four lines, 3 of 19 where 16 or more lines follow
# it (eval.py --check). Shuffled lines put the command anywhere, and then the policy did not learn the
# look-up at all: validation label accuracy 0.14 after 1750 iterations, against 0.43 with sorted lines
# (docs/household.md).
SHUFFLE_LINES = {"taxi": 0, "autoexplore": 0, "household": 0}
# Swapped Next: steps (--swap_prob=0.5) made the household policy lean on its analysis more but find its
# command less often: 175 of 356 validation states (244 without), 91 with the analysis left out
# (171), eval.py --check (docs/household.md).
SWAP_PROB = {"taxi": 0.0, "autoexplore": 0.0, "household": 0.0}
# Renaming (--rename=1) lowered the household reflection model's validation loss after 1200 iterations
# from 0.426 to 0.288 and raised the label accuracy after 3000 from 0.59 to 0.70 (policy) and from
# 0.50 to 0.73 (plain), but on the test games it lifted the no-reflection baselines far more than
# Reflect-RL (full: 61.7% against 40.0%), so it is not the default (docs/household.md).
RENAME = {"taxi": 0, "autoexplore": 0, "household": 0}

# With a pretrained start (not scratch), these replace the defaults above unless given: LoRA r=16 on the
# top 8 blocks only (the blocks below train nothing, so they run once per record, without a graph),
# batch 8, a short warm-up, no added next-token loss, and fewer iterations (the household policy's
# validation label accuracy 0.59 after 200 iterations, 0.97 after 350 of 600), the recipe measured in
# docs/pretrained.md (E1-E13); --lora_r=0 is full fine-tuning. The plain models' counts are the policy's
# (the reflection's on the taxi, where the plain policy must read the grid itself), measured on the
# household games only: validation label accuracy 0.59, 0.78, 0.75 after 250, 500, 600 (E13).
PRETRAINED = {"lora_r": 16, "lora_layers": 8, "batch_size": 8, "learning_rate": 1e-3, "warmup_iters": 20,
              "lm_loss": 0.0}
PRETRAINED_ITERS = {"taxi": {"reflection": 500, "policy": 200, "plain": 500},
                    "autoexplore": {"reflection": 300, "policy": 150, "plain": 150},
                    "household": {"reflection": 800, "policy": 600, "plain": 600}}
# The household games start from SmolLM2: its SFT agent won 68.9% of the test games after 93 minutes of
# SFT on two cores (the scratch recipe's 71.1% after 2 to 2.5 hours per policy on one thread), its
# Reflect-RL 73.3% after 32 minutes of RL (the scratch recipe's 61.7%). On the taxi SmolLM2 did not
# learn to read the grid (0%, the scratch model 94%); on AutoExplore's default data its SFT agent won
# 3.1% at depth 1 (random 9.4%), 14.1% on the search teacher's (docs/pretrained.md, E1-E12).
INIT_FROM = {"taxi": "scratch", "autoexplore": "scratch", "household": "smollm2-135m"}


def parse_args(argv):
    """--key=value overrides of the defaults above, type-checked; --flag alone means True; --help
    prints the docstring and the config block. The keys given are kept in `given`."""
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
        given.add(key)


given = set()
# on --init_from=resume these come from the command line (or the defaults), never from the checkpoint
NOT_RESUMED = {"env", "out_dir", "role", "negatives", "init_from", "device", "dtype"}


def read_jsonl(path):
    """Records with string prompt and completion; a malformed line is an error naming file and line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: missing data file {path}: run python data_gen.py --env={env} --out_dir={data_dir}")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)):
                    raise ValueError("needs string fields 'prompt' and 'completion'")
            except ValueError as e:
                raise SystemExit(f"error: {path}:{n}: malformed record ({str(e).splitlines()[0]})")
            records.append(r)
    if not records:
        raise SystemExit(f"error: {path} has no records")
    return records


def encode(tok, records, eos_id, block):
    """Token ids and completion lengths. The prompt and the completion are encoded apart, so the
    action label is one token exactly as at scoring time; the completion ends with EOS."""
    out = []
    for r in records:
        p = tok.encode(r["prompt"], add_special_tokens=False).ids
        c = tok.encode(r["completion"], add_special_tokens=False).ids + [eos_id]
        p = p[-(block - len(c)):]  # left-truncate the prompt if needed (keeps its end, the question)
        out.append((p + c, len(c)))
    return out


def permute_menu(r, labels_too=True, lines_too=False):
    """The record with its menu labels in a fresh random order (else 0, 1, ... down the menu) and, with
    lines_too, its lines too; the completion is the label of the same action as before."""
    labels, actions = parse_menu(r["prompt"])
    order = random.sample(range(len(actions)), len(actions)) if lines_too else list(range(len(actions)))
    new = random.sample(LABELS[:len(order)], len(order)) if labels_too else LABELS[:len(order)]
    head = r["prompt"].rpartition(MENU_HEAD)[0].removesuffix("\n")  # observation (and analysis)
    return {"prompt": policy_prompt(head, [actions[i] for i in order], None, new),
            "completion": new[order.index(labels.index(r["completion"]))]}


def swap_next(r):
    """The record with its analysis's last `Next:` step replaced by a random command of its menu, whose
    label becomes the target: only the analysis's words tell which (the state points elsewhere)."""
    labels, actions = parse_menu(r["prompt"])
    head, sep, _ = r["prompt"].rpartition(MENU_HEAD)[0].rpartition("Next: ")
    if not sep:
        return r
    k = random.randrange(len(actions))
    return {**r, "prompt": policy_prompt(f"{head}Next: {actions[k]}.", actions, None, labels), "completion": labels[k]}


@torch.no_grad()
def sample_analyses(records, source):
    """Each record with its teacher's analysis replaced by one that the reflection model in `source`
    samples from the record's observation, as eval.py and rl.py sample them (batched, KV cache)."""
    model, tok, _ = load_checkpoint(source)
    model.to(dev).eval()
    new_tokens = 96  # eval.py's and rl.py's reflection_max_tokens
    room = model.config.block_size - new_tokens
    g = torch.Generator(device=dev).manual_seed(seed)
    out = list(records)
    order = sorted(range(len(records)), key=lambda i: len(records[i]["prompt"]))  # similar lengths batch well
    for k in tqdm(range(0, len(order), 64), desc=f"analyses sampled by {source}"):
        batch = order[k:k + 64]
        obs = [records[i]["prompt"].partition(analyze_prompt(""))[0] for i in batch]
        ids = [tok.encode(analyze_prompt(o), add_special_tokens=False).ids[-room:] for o in obs]
        texts = model.generate(ids, new_tokens, temperature=0.7, stop=[tok.token_to_id(EOS)], generator=g)
        for i, o, t in zip(batch, obs, texts):
            labels, actions = parse_menu(records[i]["prompt"])
            out[i] = {**records[i], "prompt": policy_prompt(o, actions, tok.decode(t).strip(), labels)}
    return out


_game_names = {}


def game_names(state):
    """{object name: TextWorld type} of the game a household record was played in, rooms, player and
    inventory left out, from the game's .json beside its .z8; {} for any other record."""
    game = state.get("game", "") if isinstance(state, dict) else ""
    if not game.endswith(".z8"):
        return {}
    if game not in _game_names:
        with open(game.removesuffix(".z8") + ".json") as f:
            infos = json.load(f)["infos"]
        _game_names[game] = {i["name"]: i["type"] for _, i in infos if i["name"] and i["type"] not in ("r", "P", "I")}
    return _game_names[game]


def name_pool(records):
    """{TextWorld type: sorted names} over the games of the records (the training data's)."""
    pool = {}
    for r in records:
        for name, kind in game_names(r.get("state")).items():
            pool.setdefault(kind, set()).add(name)
    return {kind: sorted(names) for kind, names in pool.items()}


def rename_objects(r, pool):
    """The record with every object of its game renamed, the same way in prompt and completion: each
    name (whole words, any case) becomes a different random name of its type from `pool`, distinct
    within the record; a capital first letter where the game's name has none is kept."""
    names = game_names(r.get("state"))
    if not names:
        return r
    new, used = {}, set()
    for name, kind in names.items():
        choices = [n for n in pool.get(kind, ()) if n not in used and n != name]
        new[name.lower()] = (name, random.choice(choices) if choices else name)
        used.add(new[name.lower()][1])
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)

    def swap(m):
        old, name = new[m[0].lower()]
        return name[0].upper() + name[1:] if m[0][0].isupper() and not old[0].isupper() else name
    return r | {"prompt": pattern.sub(swap, r["prompt"]), "completion": pattern.sub(swap, r["completion"])}


def get_batch(examples, idxs, pad_id):
    """Right-padded (B, T) inputs, completion targets y (-1 except on the completion's tokens) and
    language-model targets y_lm (every next token, -1 on padding)."""
    T = max(len(examples[i][0]) for i in idxs)
    x = torch.full((len(idxs), T), pad_id, dtype=torch.long)
    y = torch.full((len(idxs), T), -1, dtype=torch.long)
    y_lm = torch.full((len(idxs), T), -1, dtype=torch.long)
    for row, i in enumerate(idxs):
        seq, n_comp = examples[i]
        x[row, :len(seq)] = torch.tensor(seq)
        y[row, len(seq) - n_comp - 1:len(seq) - 1] = torch.tensor(seq[-n_comp:])  # position t predicts t+1
        y_lm[row, :len(seq) - 1] = torch.tensor(seq[1:])
    return x, y, y_lm


def sft_loss(model, x, y, eos_id, y_lm=None, lm_weight=0.0):
    """Completion loss: the LM head runs only where a target exists (cheap for 1-token labels).
    Returns the mean cross-entropy (plus lm_weight times the mean cross-entropy on the y_lm
    targets), and the number of correct argmax predictions and of targets among the completion
    tokens before EOS (for the policy: the label alone, so that a trivially right EOS does not lift
    the accuracy)."""
    h = model.hidden(x)  # (B, T, C)
    sel = y >= 0
    logits = model.lm_head(h[sel]).float()  # (N, vocab)
    target = y[sel]
    counted = target != eos_id
    loss = F.cross_entropy(logits, target)
    if lm_weight:
        sel = y_lm >= 0
        loss = loss + lm_weight * F.cross_entropy(model.lm_head(h[sel]).float(), y_lm[sel])
    return loss, (logits.argmax(-1) == target)[counted].sum(), counted.sum()


def copy_batch(g, n, length, vocab):
    """n rows of `length` tokens: a span of 8 to length / 2 random tokens, repeated to the end."""
    span = torch.randint(8, length // 2 + 1, (n, 1), generator=g)
    x = torch.randint(vocab, (n, length), generator=g)
    return x.gather(1, torch.arange(length) % span)  # position i holds the token at i mod span


def warm_up_copy(model, iters, length=256):
    """Train a fresh model to copy: each sequence is a span of random tokens repeated until the
    sequence is full, under a next-token loss on every token. The default scratch model learns it
    abruptly after a plateau of about 1000 iterations; SFT afterwards undoes it (docs/autoexplore.md)."""
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=weight_decay)
    V, dev_ = model.config.vocab_size, next(model.parameters()).device
    length = min(length, model.config.block_size)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(iters), desc="copy warm-up")
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate * min(1.0, (it + 1) / warmup_iters)
        x = copy_batch(g, batch_size, length, V).to(dev_)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def get_tokenizer(init):
    """One tokenizer per environment for scratch runs, trained once on all the data and cached."""
    if init != "scratch":
        return pretrained_tokenizer(init)
    from tokenizers import Tokenizer
    path = os.path.join(out_dir, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    names = sorted(f for f in os.listdir(data_dir) if f.endswith("_train.jsonl"))
    texts = (r["prompt"] + r["completion"] for n in names for r in read_jsonl(os.path.join(data_dir, n)))
    tok = train_tokenizer(texts, vocab_size, LABELS)
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: under torchrun every rank trains and saves the same one
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def train(the_role):
    suffix = "" if negatives else "_pos"
    ckpt_dir = os.path.join(out_dir, f"sft_{the_role}{suffix}")
    log_path = os.path.join(ckpt_dir, "log.jsonl")
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP averages gradients, not weights)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    start_iter, opt_state, ckpt = 0, None, None
    if init_from == "resume":
        model, tok, ckpt = load_checkpoint(ckpt_dir)
        start_iter, opt_state, init = ckpt["iter"], ckpt["optimizer"], ckpt["init_from"]
        saved = {k: v for k, v in ckpt["config"].items() if k in config_keys and k not in given | NOT_RESUMED}
        changed = {k: v for k, v in saved.items() if v != globals()[k]}
        globals().update(saved)  # the run goes on as it was set up (batch, learning rate, data, ...)
        if changed and rank == 0:
            print(f"sft {the_role}{suffix}: resumed with the checkpoint's " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        restore_rng(ckpt["rng"], seed, rank, world)
    else:
        init = init_from
        lora = dict(dropout=dropout, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets,
                    lora_layers=lora_layers)
        start = policy_init or POLICY_INIT[env]
        if init == "scratch" and start == "reflection" and the_role != "reflection":
            source = os.path.join(out_dir, f"sft_reflection{suffix}")
            if not os.path.isfile(os.path.join(source, "ckpt.pt")):
                raise FileNotFoundError(f"the {the_role} model starts from {source}, which is not trained: run "
                                        f"sft.py --role=reflection{'' if negatives else ' --negatives=False'} first, "
                                        "or pass --policy_init=scratch")
            model, tok, _ = load_checkpoint(source)  # its own tokenizer: the weights belong to it
            print(f"sft {the_role}{suffix}: starting from the weights of {source}")
        elif init == "scratch":
            tok = get_tokenizer(init)
            model = GPT(GPTConfig(block_size=block_size, vocab_size=tok.get_vocab_size(), n_layer=n_layer,
                                  n_head=n_head, n_embd=n_embd, **lora))
            if copy_warmup:
                warm_up_copy(model.to(dev), copy_warmup)
        else:
            model = GPT.from_pretrained(init, **lora)
            tok = get_tokenizer(init)
    # on resume, the checkpoint's unless given
    iters = max_iters or (ROLE_ITERS if init == "scratch" else PRETRAINED_ITERS)[env][the_role]
    cfg = {k: globals()[k] for k in config_keys} | {"role": the_role, "max_iters": iters}
    if world > 1 and init_from != "resume":
        torch.manual_seed(seed + rank)  # then a stream of its own
    label_token_ids(tok, LABELS)  # start-up check: every action label is one token
    eos_id = tok.token_to_id(EOS)
    raw = {s: read_jsonl(os.path.join(data_dir, f"{the_role}{suffix}_{s}.jsonl")) for s in ("train", "val")}
    data = {s: encode(tok, raw[s], eos_id, model.config.block_size) for s in ("train", "val")}
    pool = name_pool(raw["train"]) if rename else {}
    sampled = []  # the training records with sampled analyses, for the policy with sampled_prob > 0
    if sampled_prob and the_role == "policy":
        source = os.path.join(out_dir, f"sft_reflection{suffix}")
        if not os.path.isfile(os.path.join(source, "ckpt.pt")):
            raise FileNotFoundError(f"--sampled_prob samples analyses from {source}, which is not trained: run "
                                    f"sft.py --role=reflection{'' if negatives else ' --negatives=False'} first")
        sampled = sample_analyses(raw["train"], source)
    if rename and not pool:
        raise ValueError(f"--rename=1 found no object names in {data_dir}: it renames the objects of generated "
                         "household games only")
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and layer norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.95))
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16" and dev == "cuda")

    @torch.no_grad()
    def evaluate():
        model.eval()
        g = random.Random(0)  # the same validation batches every time
        tot = corr = n = counted = 0
        for _ in range(eval_batches):
            x, y, _ = get_batch(data["val"], g.sample(range(len(data["val"])), min(batch_size, len(data["val"]))), eos_id)
            with autocast:
                loss, c, m = sft_loss(model, x.to(dev), y.to(dev), eos_id)
            k = (y >= 0).sum().item()
            tot, corr, n, counted = tot + loss.item() * k, corr + c.item(), n + k, counted + m.item()
        model.train()
        return tot / n, corr / counted

    def lr_at(it):  # linear warm-up, then cosine to a tenth of the peak
        if it < warmup_iters:
            return learning_rate * (it + 1) / warmup_iters
        frac = (it - warmup_iters) / max(1, iters - warmup_iters)
        return learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def checkpoint(it):
        rng = rng_states()  # every rank takes part
        if rank == 0:
            save_checkpoint(ckpt_dir, model, tok, init, iter=it, optimizer=optimizer.state_dict(), config=cfg, rng=rng)

    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(log_path, "a" if start_iter else "w") as f:
            f.write(json.dumps({"config": cfg}) + "\n")
        print(f"sft {the_role}{suffix}: {len(data['train'])} train / {len(data['val'])} val records, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable params, init {init}, device {dev}")
    model.train()
    t0, bar = time.time(), tqdm(range(start_iter, iters), desc=f"sft {the_role}{suffix}",
                                initial=start_iter, total=iters, disable=rank != 0)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        idxs = random.sample(range(len(data["train"])), min(batch_size * bucket, len(data["train"])))
        if bucket > 1:  # a random batch-sized slice of the records sorted by length
            idxs.sort(key=lambda i: len(data["train"][i][0]))
            k = random.randrange(max(1, len(idxs) // batch_size))
            idxs = idxs[k * batch_size:(k + 1) * batch_size]
        shuffle = (shuffle_labels or shuffle_lines) and the_role != "reflection"
        swap = swap_prob if the_role == "policy" else 0.0
        if shuffle or rename or swap or sampled:  # drawn records changed afresh (the bucket's lengths are the data's)
            # sampled and swap draw random numbers only when on: the default runs keep the stream they had
            recs = [sampled[i] if sampled and random.random() < sampled_prob else raw["train"][i] for i in idxs]
            recs = [rename_objects(r, pool) for r in recs] if rename else recs
            if swap:
                recs = [swap_next(r) if random.random() < swap else r for r in recs]
            recs = [permute_menu(r, shuffle_labels, shuffle_lines) for r in recs] if shuffle else recs
            x, y, y_lm = get_batch(encode(tok, recs, eos_id, model.config.block_size), range(len(idxs)), eos_id)
        else:
            x, y, y_lm = get_batch(data["train"], idxs, eos_id)
        with autocast:
            loss, _, _ = sft_loss(model, x.to(dev), y.to(dev), eos_id, y_lm.to(dev), lm_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # average gradients across ranks by hand (sft_loss calls model.hidden, not forward)
            for p in params:
                if p.grad is not None:  # the same parameters are unused on every rank (sft: the value head)
                    torch.distributed.all_reduce(p.grad)  # a sum: gloo has no average
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (it + 1) % eval_interval == 0 or it + 1 == iters:
            val_loss, val_acc = evaluate()
            rec = {"iter": it + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val_loss, 4),
                   "val_acc": round(val_acc, 4), "lr": lr_at(it), "time": round(time.time() - t0, 1)}
            if rank == 0:
                tqdm.write(f"iter {it + 1}: train loss {loss.item():.4f}, val loss {val_loss:.4f}, "
                           f"val acc {val_acc:.3f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            checkpoint(it + 1)
    if start_iter >= iters and rank == 0:
        print(f"sft {the_role}{suffix}: already at iteration {start_iter} of {iters}, nothing to do")


if __name__ == "__main__":
    parse_args(sys.argv[1:])
    if env not in ENVS:
        raise SystemExit(f"error: unknown environment {env!r}: choose from {', '.join(ENVS)}")
    roles = {"all": ["reflection", "policy", "plain"], "reflection": ["reflection"], "policy": ["policy"],
             "plain": ["plain"]}
    if role not in roles:
        raise SystemExit(f"error: unknown role {role!r}: choose from {', '.join(roles)}")
    if shuffle_labels not in (-1, 0, 1):
        raise SystemExit(f"error: --shuffle_labels wants -1, 0 or 1, got {shuffle_labels}")
    if shuffle_lines not in (-1, 0, 1):
        raise SystemExit(f"error: --shuffle_lines wants -1, 0 or 1, got {shuffle_lines}")
    if not (0 <= swap_prob <= 1 or swap_prob == -1):
        raise SystemExit(f"error: --swap_prob wants a probability (or -1), got {swap_prob}")
    if not 0 <= sampled_prob <= 1:
        raise SystemExit(f"error: --sampled_prob wants a probability, got {sampled_prob}")
    if rename not in (-1, 0, 1):
        raise SystemExit(f"error: --rename wants -1, 0 or 1, got {rename}")
    if policy_init not in ("", "scratch", "reflection"):
        raise SystemExit(f"error: unknown --policy_init={policy_init!r}: choose scratch or reflection")
    data_dir = data_dir or os.path.join("data", env)
    out_dir = out_dir or os.path.join("out", env)
    block_size = block_size or ENVS[env].context
    init_from = init_from or INIT_FROM[env]
    if init_from not in ("scratch", "resume"):
        globals().update({k: v for k, v in PRETRAINED.items() if k not in given})
    bucket = bucket or BUCKET[env]
    lm_loss = LM_LOSS[env] if lm_loss < 0 else lm_loss
    shuffle_labels = SHUFFLE_LABELS[env] if shuffle_labels < 0 else shuffle_labels
    shuffle_lines = SHUFFLE_LINES[env] if shuffle_lines < 0 else shuffle_lines
    swap_prob = SWAP_PROB[env] if swap_prob < 0 else swap_prob
    rename = RENAME[env] if rename < 0 else rename
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = device or pick_device()
    if world > 1:
        torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo")
        if dev == "cuda":
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
    if init_from != "resume" and not os.path.isfile(os.path.join(data_dir, "meta.json")) and rank == 0:
        print(f"no data in {data_dir}: generating it with data_gen.py")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_gen.py"),
                        f"--env={env}", f"--out_dir={data_dir}", f"--seed={seed}"], check=True)
    if world > 1:
        torch.distributed.barrier()
    try:
        for r in roles[role]:
            train(r)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if world > 1:  # no rank closes its connections while another still reads from them
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
