"""
Online RL of the policy with PPO, the frozen reflection model in the loop (Reflect-RL).

    python rl.py --curriculum                    # Reflect-RL: sft_policy + frozen sft_reflection
    python rl.py --curriculum --no_reflection    # the SFT+RL baseline, from sft_plain
    python rl.py --curriculum --negatives=False  # the ablation, from the positive-only SFT models

Each iteration plays `num_envs` episodes side by side to the end. At every step of every live
episode the reflection model samples an analysis (one batched KV-cache `generate` for all of them),
then ONE batched forward of the enumerated prompts gives each action's log-prob (the label tokens,
log-softmaxed over the admissible labels) and the value. Then GAE, advantage normalisation, and
`update_epochs` passes of shuffled minibatches of the clipped PPO loss, as in cleanrl's ppo.py.
With adapters on the top blocks only (`sft.py --lora_layers`), the frozen blocks' output for each
prompt is kept from the rollout and the update runs only the blocks above it (exact: they never change);
and where the reflection model is another adapter on the same base, the policy's frozen blocks go on
from its state over the observation and the analysis, so that they run on the menu alone.

Where this departs from the paper, and why:
- Episodic rollouts: every iteration starts fresh episodes and plays them out, so no value bootstrap
  is needed and a run resumes exactly from a checkpoint taken between iterations. Hitting the
  horizon is treated as the end of the episode (it is short, 15 steps).
- The value head is a linear layer on the policy's own last hidden state (shared trunk).
- PPO sees each reward times the environment's `reward_scale` (AutoExplore: 1/horizon, so that
  returns are of order 1 and the value loss does not swamp the shared trunk); logs report raw returns.
- Curriculum stages that have no training tasks (AutoExplore on a small repository) are skipped.
- Curriculum: by default a stage is left once the success rate of an iteration's episodes reaches
  `promote_at` (the paper uses a fixed schedule, available as --schedule=fixed); on a CPU budget this
  spends no iterations on stages that are already solved.
- The KL penalty to the reference policy is off by default (kl_coef=0); the clipped objective and the
  target-KL early stop keep the updates small. Unlike cleanrl, the target KL is checked before every
  minibatch step, not after each epoch: the SFT policy is very peaked, and a single large step
  (approx KL 0.39) once turned a 95%-success policy into a 0% one.
"""
import contextlib
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from envs import ENVS, LABELS, analyze_prompt, make_env, policy_prompt
from model import EOS, label_token_ids, load_checkpoint, pick_device, restore_rng, rng_states, save_checkpoint

# ----------------------------------------------------------------------------- config
env = "taxi"  # see envs.ENVS
env_options = ""  # the environment's own settings, "key=value,..." (see envs.make_env)
out_dir = ""  # "" means out/{env}; this run writes {out_dir}/rl[_plain][_pos]/
policy_from = ""  # SFT checkpoint dir; "" means {out_dir}/sft_policy (sft_plain with --no_reflection)
reflection_from = ""  # frozen reflection model; "" means {out_dir}/sft_reflection
no_reflection = False  # the SFT+RL baseline: no analysis in the prompt
negatives = True  # False: start from the positive-only SFT models (the ablation)
resume = False  # continue this run from its checkpoint, with the options it was started with except
               # those given again (env, out_dir, no_reflection, negatives and device always are)
# curriculum
curriculum = False  # walk the environment's stages in order; otherwise train on `stage` alone
stage = ""  # without --curriculum: "" means the env's last (hardest) stage
schedule = "threshold"  # threshold: next stage when an iteration's success >= promote_at | fixed
promote_at = 0.9
stage_iters = ""  # fixed schedule: iterations per stage, e.g. "10,10,20" ("" splits total_iters evenly)
# rollouts
total_iters = 40
num_envs = 64  # episodes per iteration
horizon = 0  # 0 means the env's default
reflection_temperature = 0.7
reflection_max_tokens = 96
shuffle_labels = False  # permute the action labels at every step (against position bias)
# PPO
learning_rate = 1e-4
gamma = 0.99
gae_lambda = 0.95
update_epochs = 2
minibatch_size = 64
clip_coef = 0.2
ent_coef = 0.01
vf_coef = 0.5
kl_coef = 0.0  # KL(policy || reference) penalty; the reference is the policy at the start of RL
target_kl = 0.02  # stop an update once the approximate KL passes this (0: never)
max_grad_norm = 0.5
save_interval = 5  # iterations between checkpoints
seed = 1337
device = ""  # "" picks cuda, then mps, then cpu
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()  # lower-case names only: not the imported LABELS and EOS
               if k.islower() and not k.startswith("_") and isinstance(v, (int, float, bool, str))]


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
# on --resume these come from the command line (they name the run), never from the checkpoint
NOT_RESUMED = {"env", "out_dir", "no_reflection", "negatives", "resume", "device"}


# ----------------------------------------------------------------------------- the algorithm
def compute_gae(rewards, values, dones, next_value, gamma, lam):
    """rewards, values, dones: (T, N); dones[t] = 1 if the episode ended with action t.
    next_value (N,) is the value after the last step. Returns advantages and returns, (T, N)."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nextvalues = next_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nextvalues * nonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * lam * nonterminal * lastgaelam
    return advantages, advantages + values


def ppo_loss(logp, old_logp, advantages, values, returns, entropy, clip, vf, ent, kl=None, kl_c=0.0):
    """The clipped surrogate, value loss and entropy bonus (all (B,) tensors).
    Returns the loss and the diagnostics (approx KL, clip fraction)."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    v_loss = 0.5 * ((values - returns) ** 2).mean()
    loss = pg_loss + vf * v_loss - ent * entropy.mean()
    if kl is not None:
        loss = loss + kl_c * kl.mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()  # the low-variance estimator (k3)
        clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
    return loss, dict(pg_loss=pg_loss.item(), v_loss=v_loss.item(), approx_kl=approx_kl.item(),
                      clipfrac=clipfrac.item())


def pad_batch(seqs, pad_id, dev):
    """Right-pad token lists into (B, T) with their lengths."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    return idx.to(dev), torch.tensor([len(s) for s in seqs], device=dev)


def score(model, prompts, n_actions, label_ids, pad_id, dev, **trunk):
    """Single-prompt action enumeration for a batch: log-probs (B, A_max) and values (B,) (and with
    keep_trunk=True the frozen blocks' output per prompt, which trunk=... gives back in the update)."""
    A = max(n_actions)
    idx, lengths = pad_batch(prompts, pad_id, dev)
    labels = torch.tensor([ids + [ids[0]] * (A - len(ids)) for ids in label_ids], device=dev)  # (B, A)
    amask = torch.arange(A, device=dev)[None] < torch.tensor(n_actions, device=dev)[:, None]
    return model.score_actions(idx, lengths, labels, amask, **trunk)


def entropy_of(logp):
    """Entropy over the admissible actions; masked ones (-inf) add 0 to the value and to the gradient
    (a torch.where over p * logp would back-propagate 0 * inf = nan through the masked entries)."""
    return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)


@torch.no_grad()
def rollout(envs, tasks, policy, tok, refl, rtok, gen):
    """Play one episode per env to the end. Returns the flat transitions and per-episode stats."""
    eos, block = tok.token_to_id(EOS), policy.config.block_size
    for e, task in zip(envs, tasks):
        e.reset(task, seed=random.randrange(2**31))
    live = list(range(len(envs)))
    steps = [[] for _ in envs]  # per env: (prompt ids, label ids, action, logp, value, reward, done, trunk)
    stats = [dict(ret=0.0, success=False, dangerous=False, steps=0) for _ in envs]
    while live:
        reflections = [None] * len(live)
        if refl is not None:
            ids = [rtok.encode(analyze_prompt(envs[i].observation), add_special_tokens=False).ids for i in live]
            ids = [p[-(refl.config.block_size - reflection_max_tokens):] for p in ids]
            out = refl.generate(ids, reflection_max_tokens, temperature=reflection_temperature,
                                stop=[rtok.token_to_id(EOS)], generator=gen,
                                keep=policy.frozen_blocks() if trunk_shared else 0)
            out, kept = out if trunk_shared else (out, None)
            reflections = [rtok.decode(o).strip() for o in out]
        prompts, label_ids, n_actions = [], [], []
        for i, r in zip(live, reflections):
            acts = envs[i].actions
            labels = random.sample(LABELS[:len(acts)], len(acts)) if shuffle_labels else LABELS[:len(acts)]
            prompts.append(tok.encode(policy_prompt(envs[i].observation, acts, r, labels), add_special_tokens=False).ids[-block:])
            label_ids.append([LABEL_ID[l] for l in labels])
            n_actions.append(len(acts))
        if trunk_shared:  # the frozen blocks go on from the reflection model's state
            trunk = policy.extend_trunk(prompts, kept)
            logp, value = score(policy, prompts, n_actions, label_ids, eos, dev, trunk=trunk)
        else:
            logp, value, trunk = score(policy, prompts, n_actions, label_ids, eos, dev, keep_trunk=True)
        actions = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1).tolist()
        still = []
        for k, i in enumerate(live):
            reward, done, info = envs[i].step(actions[k])
            steps[i].append((prompts[k], label_ids[k], actions[k], logp[k, actions[k]].item(), value[k].item(),
                             reward * envs[i].reward_scale, float(done), trunk[k]))  # PPO sees rewards of order 1
            s = stats[i]
            s["ret"] += reward
            s["steps"] += 1
            if done:
                s["success"], s["dangerous"] = bool(info["success"]), bool(info.get("dangerous", False))
            else:
                still.append(i)
        live = still
    return steps, stats


def gae_per_episode(steps):
    """Advantages and returns of each finished episode (its value after the end is 0)."""
    flat, advs, rets = [], [], []
    for ep in steps:
        r = torch.tensor([s[5] for s in ep])[:, None]
        v = torch.tensor([s[4] for s in ep])[:, None]
        d = torch.tensor([s[6] for s in ep])[:, None]
        a, ret = compute_gae(r, v, d, torch.zeros(1), gamma, gae_lambda)
        flat += ep
        advs.append(a[:, 0])
        rets.append(ret[:, 0])
    return flat, torch.cat(advs), torch.cat(rets)


def update(policy, ref, optimizer, flat, advantages, returns, pad_id):
    """PPO epochs over shuffled minibatches, stopped early once the approximate KL to the rollout
    policy passes target_kl. Returns the diagnostics of the last minibatch seen."""
    params = [p for p in policy.parameters() if p.requires_grad]
    old_logp = torch.tensor([s[3] for s in flat], device=dev)
    actions = torch.tensor([s[2] for s in flat], device=dev)
    advantages, returns = advantages.to(dev), returns.to(dev)
    policy.train()
    diag, n = {}, len(flat)
    n_mb = torch.tensor(math.ceil(n / minibatch_size))
    if world > 1:  # ranks hold different numbers of steps but must take the same number of updates
        torch.distributed.all_reduce(n_mb, op=torch.distributed.ReduceOp.MIN)
    minibatches = [mb.tolist() for _ in range(update_epochs) for mb in torch.tensor_split(torch.randperm(n), int(n_mb))]
    updates = 0
    for mb in minibatches:
        batch = [flat[i] for i in mb]
        trunk = [s[7] for s in batch]  # the frozen blocks' output from the rollout: only the top blocks run
        logp_all, value = score(policy, [s[0] for s in batch], [len(s[1]) for s in batch],
                                [s[1] for s in batch], pad_id, dev, trunk=trunk)
        logp = logp_all.gather(1, actions[mb, None]).squeeze(1)
        adv = advantages[mb]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(mb) > 1 else adv  # normalise per minibatch
        kl = None
        if kl_coef > 0:  # KL(pi || ref) over the admissible actions, exactly (the action set is small)
            with torch.no_grad(), ref() as r:
                ref_logp, _ = score(r, [s[0] for s in batch], [len(s[1]) for s in batch],
                                    [s[1] for s in batch], pad_id, dev, trunk=trunk)
            kl = (logp_all.exp() * (logp_all - ref_logp).masked_fill(~torch.isfinite(logp_all), 0.0)).sum(-1)
        loss, diag = ppo_loss(logp, old_logp[mb], adv, value, returns[mb], entropy_of(logp_all),
                              clip_coef, vf_coef, ent_coef, kl, kl_coef)
        diag["entropy"] = entropy_of(logp_all).mean().item()
        akl = torch.tensor(diag["approx_kl"])
        if world > 1:  # every rank must take the same early-stop decision
            torch.distributed.all_reduce(akl)
            akl /= world
        if target_kl > 0 and akl.item() > target_kl:
            break  # checked before every step, not once per epoch: one large step can wreck a peaked policy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # data parallel: average the gradients of all ranks
            for p in params:
                torch.distributed.all_reduce(p.grad)  # a sum: gloo has no average
                p.grad /= world
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        updates += 1
    policy.eval()
    var = returns.var()
    diag["explained_var"] = float("nan") if var == 0 else (1 - (returns - torch.tensor(
        [s[4] for s in flat], device=dev)).var() / var).item()
    diag["updates"] = updates
    return diag


if __name__ == "__main__":
    parse_args(sys.argv[1:])
    if env not in ENVS:
        raise SystemExit(f"error: unknown environment {env!r}: choose from {', '.join(ENVS)}")
    if schedule not in ("threshold", "fixed"):
        raise SystemExit(f"error: unknown schedule {schedule!r}: choose from threshold, fixed")
    out_dir = out_dir or os.path.join("out", env)
    suffix = ("_plain" if no_reflection else "") + ("" if negatives else "_pos")
    run_dir = os.path.join(out_dir, "rl" + suffix)
    if resume:  # the run goes on with the options it was started with, except those given again
        path = os.path.join(run_dir, "ckpt.pt")
        if not os.path.isfile(path):
            raise SystemExit(f"error: no checkpoint at {path}: nothing to resume")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
        except Exception as e:
            raise SystemExit(f"error: cannot load checkpoint {path}: {str(e).splitlines()[0]}")
        changed = {k: v for k, v in saved.items()
                   if k in config_keys and k not in given | NOT_RESUMED and v != globals()[k]}
        globals().update(changed)
        if changed and int(os.environ.get("RANK", 0)) == 0:
            print("rl: resumed with the checkpoint's " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    policy_from = policy_from or os.path.join(out_dir, ("sft_plain" if no_reflection else "sft_policy") + ("" if negatives else "_pos"))
    reflection_from = "" if no_reflection else (reflection_from or os.path.join(out_dir, "sft_reflection" + suffix))
    stages = list(ENVS[env].stages) if curriculum else [stage or ENVS[env].stages[-1]]
    try:  # an unknown stage or option fails here, before any work; a stage with no training tasks is skipped
        trainable = [s for s in stages if make_env(env, s, horizon or None, env_options).tasks("train")]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if not trainable:
        raise SystemExit(f"error: no training tasks in stage(s) {', '.join(stages)} of {env}")
    if trainable != stages:
        print(f"rl: no training tasks in stage(s) {', '.join(s for s in stages if s not in trainable)}, skipped")
        stages = trainable
    share = total_iters // len(stages)  # the fixed schedule's default: equal shares, the rest to the last stage
    fixed = [int(x) for x in stage_iters.split(",")] if stage_iters else \
        [share] * (len(stages) - 1) + [total_iters - share * (len(stages) - 1)]
    if schedule == "fixed" and len(fixed) != len(stages):
        raise SystemExit(f"error: --stage_iters needs {len(stages)} numbers, one per stage ({', '.join(stages)})")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = device or pick_device()
    if world > 1:
        torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo")
        if dev == "cuda":
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
    cfg = {k: globals()[k] for k in config_keys}
    try:
        policy, tok, ckpt = load_checkpoint(run_dir if resume else policy_from, dev)
        refl, rtok = (None, None)
        if reflection_from:
            refl, rtok, _ = load_checkpoint(reflection_from, dev)
            refl.eval()
        LABEL_ID = dict(zip(LABELS, label_token_ids(tok, LABELS)))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    init_from = ckpt["init_from"]
    trunk_shared = refl is not None and policy.shares_trunk(refl)  # two adapters on one base: one trunk pass per state
    policy.eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, eps=1e-5, weight_decay=0.0)
    ref = None
    if kl_coef > 0:  # LoRA: the same model with adapters off; full fine-tuning: a frozen copy
        frozen = copy.deepcopy(policy).eval() if policy.config.lora_r == 0 else None
        ref = policy.adapters_disabled if frozen is None else (lambda: contextlib.nullcontext(frozen))
    it, stage_idx, stage_start, env_steps = 0, 0, 0, 0
    gen = torch.Generator().manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if resume:
        it, stage_idx, stage_start, env_steps = ckpt["iter"], ckpt["stage_idx"], ckpt["stage_start"], ckpt["env_steps"]
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"], seed, rank, world, gen)
    log_path = os.path.join(run_dir, "log.jsonl")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(log_path, "a" if resume else "w") as f:
            f.write(json.dumps({"config": cfg, "policy_from": policy_from, "reflection_from": reflection_from}) + "\n")
        print(f"rl {run_dir}: policy {policy_from}, reflection {reflection_from or 'none'}, stages {stages}, "
              f"{num_envs} episodes/iter x {total_iters} iters, device {dev}")

    def checkpoint():
        rng = rng_states(gen)  # every rank takes part
        if rank == 0:
            save_checkpoint(run_dir, policy, tok, init_from, iter=it, stage_idx=stage_idx, stage_start=stage_start,
                            env_steps=env_steps,
                            optimizer=optimizer.state_dict(), config=cfg | {"policy_from": policy_from,
                                                                            "reflection_from": reflection_from},
                            rng=rng)

    envs = [make_env(env, stages[stage_idx], horizon or None, env_options) for _ in range(num_envs)]
    bar = tqdm(range(it, total_iters), initial=it, total=total_iters, desc="rl", disable=rank != 0)
    for it in bar:
        t0 = time.time()
        train_tasks = envs[0].tasks("train")
        steps, stats = rollout(envs, [random.choice(train_tasks) for _ in envs], policy, tok, refl, rtok, gen)
        t_roll = time.time() - t0
        flat, adv, ret = gae_per_episode(steps)
        diag = update(policy, ref, optimizer, flat, adv, ret, tok.token_to_id(EOS))
        env_steps += len(flat)
        success = float(np.mean([s["success"] for s in stats]))
        rec = dict(iter=it + 1, stage=stages[stage_idx], success=success,
                   ret=float(np.mean([s["ret"] for s in stats])), dangerous=float(np.mean([s["dangerous"] for s in stats])),
                   ep_steps=float(np.mean([s["steps"] for s in stats])), env_steps=env_steps,
                   steps_per_s=len(flat) / t_roll, time=time.time() - t0, **diag)
        if rank == 0:
            tqdm.write(f"iter {it + 1} [{rec['stage']}]: success {success:.2f}, return {rec['ret']:.2f}, "
                       f"dangerous {rec['dangerous']:.2f}, kl {diag['approx_kl']:.4f}, clipfrac {diag['clipfrac']:.2f}, "
                       f"entropy {diag['entropy']:.3f}, expl var {diag['explained_var']:.2f}, "
                       f"{rec['steps_per_s']:.1f} env steps/s")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        done_here = it + 1 - stage_start
        promote = success >= promote_at if schedule == "threshold" else done_here >= fixed[stage_idx]
        if curriculum and promote and stage_idx + 1 < len(stages):
            stage_idx, stage_start = stage_idx + 1, it + 1
            envs = [make_env(env, stages[stage_idx], horizon or None, env_options) for _ in range(num_envs)]
            if rank == 0:
                tqdm.write(f"curriculum: on to stage {stages[stage_idx]}")
        it += 1  # from here on `it` counts finished iterations, as the checkpoint records
        if it % save_interval == 0 or it == total_iters:
            checkpoint()
    if world > 1:  # no rank closes its connections while another still reads from them
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
