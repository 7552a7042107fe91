"""sft.py and rl.py: the loss masks (and --lm_loss), GAE and the PPO loss by hand, tiny end-to-end
runs of every stage in subprocesses, determinism, exact resume, and bad input."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rl  # noqa: E402
import sft  # noqa: E402
from model import EOS, GPT, GPTConfig, restore_rng, rng_states, train_tokenizer  # noqa: E402
from envs import LABELS  # noqa: E402

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=400", "--batch_size=8", "--eval_interval=2",
        "--eval_batches=1", "--device=cpu"]


def run(script, *args, ok=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_loss_masks_and_the_added_lm_loss():
    tok = train_tokenizer(["Taxi at (0,1). Next: move south.\n # Action:\n3"] * 20, 300, LABELS)
    recs = [{"prompt": "Taxi at (0,1).\n # Action:\n", "completion": "3"},
            {"prompt": "x", "completion": "Next: move south."}]
    eos = tok.token_to_id(EOS)
    ex = sft.encode(tok, recs, eos, 512)
    x, y, y_lm = sft.get_batch(ex, [0, 1], eos)
    for row, r in enumerate(recs):
        p = tok.encode(r["prompt"]).ids
        c = tok.encode(r["completion"]).ids + [eos]
        want = [-1] * (len(p) - 1) + c + [-1] * (x.shape[1] - len(p) - len(c) + 1)
        assert y[row].tolist() == want
        assert y_lm[row].tolist() == (p + c)[1:] + [-1] * (x.shape[1] - len(p) - len(c) + 1)  # --lm_loss
        assert x[row, :len(p) + len(c)].tolist() == p + c
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=32))
    plain, _, _ = sft.sft_loss(model, x, y, eos)
    both, _, _ = sft.sft_loss(model, x, y, eos, y_lm, 0.5)
    lm = F.cross_entropy(model(x).flatten(0, 1), y_lm.flatten(), ignore_index=-1)  # the whole records
    assert torch.allclose(both, plain + 0.5 * lm, atol=1e-5)


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [0.2, 0.0], [0.1, 0.0]])
    dones = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    adv, ret = rl.compute_gae(rewards[:, :1], values[:, :1], dones[:, :1], torch.zeros(1), 0.9, 0.8)
    # t=2: 2 - 0.1 = 1.9; t=1: 0 + 0.9*0.1 - 0.2 + 0.72*1.9; t=0: 1 + 0.9*0.2 - 0.5 + 0.72*A1
    a1 = -0.11 + 0.72 * 1.9
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.68 + 0.72 * a1, a1, 1.9]))
    torch.testing.assert_close(ret[:, 0], adv[:, 0] + values[:, 0])
    # an episode that ends at t=0 and a new one that is cut at t=2 and bootstrapped with value 1
    adv, _ = rl.compute_gae(rewards[:, 1:], values[:, 1:], dones[:, 1:], torch.ones(1), 1.0, 1.0)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, 3.0, 2.0]))


def test_ppo_loss_by_hand():
    logp, old = torch.tensor([0.5, 0.2]).log(), torch.tensor([0.25, 0.2]).log()
    loss, d = rl.ppo_loss(logp, old, torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]),
                          torch.tensor([1.0, 1.0]), clip=0.2, vf=0.5, ent=0.01)
    # ratio (2, 1): clipped surrogate mean(-1.2, 1) = -0.1; value 0.5 * mean(1, 0) = 0.25
    assert math.isclose(loss.item(), -0.1 + 0.5 * 0.25 - 0.01, abs_tol=1e-6)
    assert math.isclose(d["clipfrac"], 0.5) and math.isclose(d["approx_kl"], (1 - math.log(2)) / 2, abs_tol=1e-6)


def test_entropy_gradient_with_masked_actions():
    # environments with fewer actions than others pad with -inf log-probs: the entropy bonus must
    # leave a finite gradient (household games have varying numbers of actions; taxi always six)
    logits = torch.tensor([[1.0, 2.0, float("-inf")]], requires_grad=True)
    entropy = rl.entropy_of(torch.log_softmax(logits, -1))
    entropy.sum().backward()
    p = torch.softmax(torch.tensor([1.0, 2.0]), -1)
    assert math.isclose(entropy.item(), -(p * p.log()).sum().item(), rel_tol=1e-6)
    assert torch.isfinite(logits.grad).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny data, and every SFT model, trained once for the tests below."""
    d = tmp_path_factory.mktemp("run")
    data, out = str(d / "data"), str(d / "out")
    run("data_gen.py", f"--out_dir={data}", "--episodes=6", "--val_episodes=2")
    for neg in ("True", "False"):
        run("sft.py", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=4", f"--negatives={neg}", *TINY)
    return data, out


def test_copy_warm_up(trained, tmp_path, monkeypatch):
    data, _ = trained
    args = [f"--data_dir={data}", "--role=reflection", "--max_iters=1", *TINY]
    run("sft.py", *args, f"--out_dir={tmp_path / 'plain'}")
    assert "copy warm-up" in run("sft.py", *args, f"--out_dir={tmp_path / 'warm'}", "--copy_warmup=3").stderr
    a, b = (torch.load(tmp_path / d / "sft_reflection" / "ckpt.pt", weights_only=True)["model"]
            for d in ("plain", "warm"))
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])  # the warm-up ran before the same SFT step
    x = sft.copy_batch(torch.Generator().manual_seed(0), 64, 48, 16)
    spans = [next(s for s in range(8, 25) if torch.equal(row[s:], row[:-s])) for row in x]  # each row repeats
    assert len(set(spans)) > 5  # spans of many lengths
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    x = sft.copy_batch(torch.Generator().manual_seed(1), 64, 48, 64)

    def copy_loss():  # on the second half of each row, which repeats the first
        with torch.no_grad():
            return F.cross_entropy(model(x[:, :-1])[:, 24:].flatten(0, 1), x[:, 25:].flatten()).item()

    assert copy_loss() > 0.95 * math.log(64)  # no better than a guess
    monkeypatch.setattr(sft, "batch_size", 16)
    sft.warm_up_copy(model, 1500, length=48)
    assert copy_loss() < 0.8 * math.log(64)


def rl_args(out, *extra):
    return [f"--out_dir={out}", "--num_envs=3", "--minibatch_size=8", "--reflection_max_tokens=12", "--device=cpu",
            *extra]


def log_records(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "steps_per_s")}
                for line in f if '"iter"' in line]


def test_end_to_end_and_determinism(trained):
    _, out = trained
    for name in ("sft_reflection", "sft_policy", "sft_plain", "sft_reflection_pos", "sft_policy_pos"):
        assert os.path.isfile(os.path.join(out, name, "ckpt.pt")), name
    run("rl.py", *rl_args(out, "--curriculum", "--schedule=fixed", "--stage_iters=1,1,1", "--total_iters=3"))
    first = log_records(os.path.join(out, "rl", "log.jsonl"))
    assert [r["stage"] for r in first] == ["pickup", "dropoff", "full"]
    run("rl.py", *rl_args(out, "--curriculum", "--schedule=fixed", "--stage_iters=1,1,1", "--total_iters=3"))
    assert log_records(os.path.join(out, "rl", "log.jsonl")) == first  # same seed, same numbers
    run("rl.py", *rl_args(out, "--no_reflection", "--total_iters=2", "--kl_coef=0.1"))
    run("rl.py", *rl_args(out, "--negatives=False", "--total_iters=1"))
    p = run("eval.py", f"--out_dir={out}", "--episodes=6", "--stages=pickup", "--reflection_max_tokens=12")
    results = json.load(open(os.path.join(out, "eval.json")))["stages"]["pickup"]["results"]
    names = {r["method"] for r in results}
    assert {"Reflect-RL", "SFT+RL (no reflection)", "Reflect-RL (no negatives)", "Random", "Oracle"} <= names, p.stdout


def test_resume_is_exact(trained, tmp_path):
    _, out = trained
    args = rl_args(out, "--curriculum", "--promote_at=0.0", "--save_interval=1")
    run("rl.py", *args, "--total_iters=3", "--no_reflection")
    whole = log_records(os.path.join(out, "rl_plain", "log.jsonl"))
    run("rl.py", *args, "--total_iters=2", "--no_reflection")
    p = run("rl.py", f"--out_dir={out}", "--total_iters=3", "--no_reflection", "--resume", "--device=cpu")
    assert log_records(os.path.join(out, "rl_plain", "log.jsonl")) == whole  # the other options: the checkpoint's
    assert "resumed with the checkpoint's" in p.stdout and "num_envs=3" in p.stdout, p.stdout


def test_sft_resume_continues(trained):
    """Resumed with only the new iteration count, the run keeps its own data, batch and intervals."""
    data, out = trained
    p = run("sft.py", f"--out_dir={out}", "--role=plain", "--init_from=resume", "--max_iters=6")
    logs = [json.loads(line) for line in open(os.path.join(out, "sft_plain", "log.jsonl"))]
    assert [r["iter"] for r in logs if "iter" in r] == [2, 4, 6], p.stdout
    resumed = [r for r in logs if "config" in r][-1]["config"]  # the line written when the run went on
    assert (resumed["data_dir"], resumed["batch_size"], resumed["max_iters"]) == (data, 8, 6)
    assert "resumed with the checkpoint's" in p.stdout and "batch_size=8" in p.stdout, p.stdout


def test_policy_can_start_from_the_reflection_model(trained, tmp_path):
    data, out = trained
    args = [f"--data_dir={data}", f"--out_dir={tmp_path}", "--role=policy", "--policy_init=reflection", *TINY]
    p = run("sft.py", *args, "--max_iters=2", ok=False)
    assert p.returncode != 0 and p.stderr.startswith("error: the policy model starts from") \
        and len(p.stderr.strip().splitlines()) == 1
    p = run("sft.py", *args[:-len(TINY)], "--policy_init=pretrained", ok=False)
    assert p.returncode != 0 and "--policy_init" in p.stderr
    refl = torch.load(os.path.join(out, "sft_reflection", "ckpt.pt"), weights_only=True)
    (tmp_path / "sft_reflection").mkdir()
    torch.save(refl, tmp_path / "sft_reflection" / "ckpt.pt")
    (tmp_path / "sft_reflection" / "tokenizer.json").write_text(open(os.path.join(out, "sft_reflection", "tokenizer.json")).read())
    run("sft.py", *args, "--max_iters=2", "--learning_rate=0")  # no step size: the weights stay the reflection's
    pol = torch.load(tmp_path / "sft_policy" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, refl["model"][k]) for k, v in pol["model"].items()), "not the reflection's weights"
    run("sft.py", *args, "--max_iters=2", "--policy_init=scratch", "--init_from=scratch")
    pol = torch.load(tmp_path / "sft_policy" / "ckpt.pt", weights_only=True)
    assert not torch.equal(pol["model"]["lm_head.weight"], refl["model"]["lm_head.weight"])


def test_permuted_labels_and_lines_follow_their_actions(trained, tmp_path):
    import envs
    acts = ["move south", "move north", "pick up"]
    rec = {"prompt": envs.policy_prompt("Taxi at (0,1).", acts, "Next: pick up."), "completion": "2"}
    assert sft.permute_menu(rec, labels_too=False) == rec
    random.seed(0)
    for labels_too, lines_too in ((True, False), (False, True), (True, True)):
        seen = set()
        for _ in range(400):
            r = sft.permute_menu(rec, labels_too, lines_too)
            labels, actions = envs.parse_menu(r["prompt"])
            assert sorted(actions) == sorted(acts) and sorted(labels) == ["0", "1", "2"]
            assert actions == acts or lines_too
            assert labels == ["0", "1", "2"] or labels_too
            assert actions[labels.index(r["completion"])] == "pick up"
            assert r["prompt"] == envs.policy_prompt("Taxi at (0,1).", actions, "Next: pick up.", labels)
            seen.add((tuple(labels), tuple(actions)))
        assert len(seen) == 6 * (1 + 5 * (labels_too and lines_too))  # every order of what is permuted turns up
    data, _ = trained
    run("sft.py", f"--data_dir={data}", f"--out_dir={tmp_path}", "--role=plain", "--max_iters=2", "--shuffle_labels=1",
        "--shuffle_lines=1", *TINY)
    p = run("sft.py", "--shuffle_labels=2", ok=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --shuffle_labels wants -1, 0 or 1, got 2"
    p = run("sft.py", "--shuffle_lines=-2", ok=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --shuffle_lines wants -1, 0 or 1, got -2"


def test_swapped_next_step_is_the_target(trained, tmp_path):
    import envs
    acts = ["move south", "move north", "pick up"]
    rec = {"prompt": envs.policy_prompt("Taxi at (0,1).", acts, "Plan: pick up. Next: pick up."), "completion": "2", "stage": "full"}
    random.seed(0)
    named = set()
    for _ in range(60):
        r = sft.swap_next(rec)
        labels, actions = envs.parse_menu(r["prompt"])
        assert actions == acts and labels == ["0", "1", "2"] and r["stage"] == "full"
        step = actions[labels.index(r["completion"])]
        assert r["prompt"] == envs.policy_prompt("Taxi at (0,1).", acts, f"Plan: pick up. Next: {step}.")
        named.add(step)
    assert named == set(acts)
    plain = {"prompt": envs.policy_prompt("Taxi at (0,1).", acts), "completion": "2"}
    assert sft.swap_next(plain) == plain  # no analysis, nothing to swap
    data, _ = trained
    run("sft.py", f"--data_dir={data}", f"--out_dir={tmp_path}", "--role=policy", "--max_iters=2", "--swap_prob=1", *TINY)
    p = run("sft.py", "--swap_prob=1.5", ok=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --swap_prob wants a probability (or -1), got 1.5"


def test_sampled_analyses(trained, tmp_path, monkeypatch):
    """The reflection model's analysis replaces the teacher's, observation, menu and target kept."""
    import shutil
    import envs
    data, out = trained
    monkeypatch.setattr(sft, "dev", "cpu", raising=False)  # set by sft.py's main, not on import
    monkeypatch.setattr(sft, "seed", 0)
    recs = [json.loads(line) for line in open(os.path.join(data, "policy_train.jsonl"))][:20]
    new = sft.sample_analyses(recs, os.path.join(out, "sft_reflection"))
    assert new == sft.sample_analyses(recs, os.path.join(out, "sft_reflection"))  # seeded
    changed = 0
    for r, n in zip(recs, new):
        obs, _, rest = r["prompt"].partition(envs.analyze_prompt(""))
        analysis = n["prompt"].partition(envs.analyze_prompt(""))[2].partition("\n" + envs.MENU_HEAD)[0]
        labels, actions = envs.parse_menu(r["prompt"])
        assert n == {**r, "prompt": envs.policy_prompt(obs, actions, analysis, labels)}
        changed += analysis != rest.partition("\n" + envs.MENU_HEAD)[0]
    assert changed > 0  # a model trained 4 iterations does not write the teacher's analyses
    shutil.copytree(os.path.join(out, "sft_reflection"), tmp_path / "sft_reflection")
    shutil.copy(os.path.join(out, "tokenizer.json"), tmp_path / "tokenizer.json")
    args = [f"--data_dir={data}", "--role=policy", "--max_iters=2", *TINY]
    p = run("sft.py", f"--out_dir={tmp_path}", *args, "--sampled_prob=1")
    assert "analyses sampled by" in p.stderr and os.path.isfile(tmp_path / "sft_policy" / "ckpt.pt")
    p = run("sft.py", f"--out_dir={tmp_path / 'none'}", *args, "--sampled_prob=0.5", ok=False)
    assert p.returncode != 0 and p.stderr.startswith("error: --sampled_prob samples analyses from") \
        and len(p.stderr.strip().splitlines()) == 1
    p = run("sft.py", "--sampled_prob=1.5", ok=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --sampled_prob wants a probability, got 1.5"


def test_renamed_objects(trained, tmp_path):
    """Every name of the record's game becomes another training name of its type, the same in prompt and
    completion, whole words only, capitals kept; records without a TextWorld game stay as they are."""
    data, _ = trained

    def game(name, objects):
        infos = [["P", {"type": "P", "name": None}], ["r_0", {"type": "r", "name": "kitchen"}]]
        infos += [[f"o_{i}", {"type": kind, "name": n}] for i, (n, kind) in enumerate(objects)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"infos": infos}))
        return {"game": str(tmp_path / f"{name}.z8"), "commands": []}
    train = [{"prompt": "", "completion": "", "state": game("a", [("red key", "k"), ("safe", "c"), ("hat", "o")])},
             {"prompt": "", "completion": "", "state": game("b", [("blue key", "k"), ("type 5 box", "c"), ("cap", "o")])}]
    pool = sft.name_pool(train)
    assert pool == {"k": ["blue key", "red key"], "c": ["safe", "type 5 box"], "o": ["cap", "hat"]}
    rec = {"prompt": "Goal: Put the hat in the safe. Here: kitchen. A safe, a hats rack. Red key here.",
           "completion": "Next: insert hat into safe.", "state": train[0]["state"]}
    r = sft.rename_objects(rec, pool)
    assert r["prompt"] == ("Goal: Put the cap in the type 5 box. Here: kitchen. A type 5 box, a hats rack. "
                           "Blue key here.")
    assert r["completion"] == "Next: insert cap into type 5 box." and r["state"] == rec["state"]
    plain = {"prompt": "Taxi at (0,1).", "completion": "1", "state": 7}
    assert sft.rename_objects(plain, pool) is plain and sft.name_pool([plain]) == {}
    p = run("sft.py", "--rename=2", ok=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --rename wants -1, 0 or 1, got 2"
    p = run("sft.py", f"--data_dir={data}", f"--out_dir={tmp_path}", "--role=plain", "--rename=1", *TINY, ok=False)
    assert p.returncode != 0 and p.stderr.strip().endswith("renames the objects of generated household games only")


def test_help():
    """--help (or -h) prints the script's docstring and every option with its default, and exits 0."""
    import data_gen
    import eval as evaluate
    keys = {"data_gen.py": data_gen.config_keys, "sft.py": sft.config_keys, "rl.py": rl.config_keys,
            "eval.py": evaluate.config_keys, "bench.py": ["configs", "device", "dtype", "reps"]}
    for script, names in keys.items():
        for flag in ("--help", "-h"):
            p = run(script, flag)
            assert p.stderr == "" and p.stdout.startswith(open(os.path.join(ROOT, script)).read().split("\n")[1])
            assert all(f"\n{k} = " in p.stdout for k in names), script
            assert "config_keys" not in p.stdout


def test_bad_input(trained, tmp_path):
    data, out = trained
    for script in ("sft.py", "rl.py", "data_gen.py"):
        for flag in ("--no_such_flag=1", "--EOS=x"):  # an imported constant is not an option either
            p = run(script, flag, ok=False)
            assert p.returncode != 0 and "unknown option" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        p = run(script, "--env=chess", ok=False)
        assert p.returncode != 0 and "chess" in p.stderr.strip().splitlines()[-1]
    for resume in ((), ("--resume",)):
        p = run("rl.py", f"--out_dir={tmp_path}", *resume, ok=False)
        assert p.returncode != 0 and p.stderr.startswith("error: no checkpoint")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(data):
        (bad / name).write_text(open(os.path.join(data, name)).read())
    with open(bad / "plain_train.jsonl", "a") as f:
        f.write('{"prompt": "no completion"}\n')
    n = sum(1 for _ in open(bad / "plain_train.jsonl"))
    p = run("sft.py", f"--data_dir={bad}", f"--out_dir={tmp_path / 'o'}", "--role=plain", "--max_iters=1", *TINY, ok=False)
    assert p.returncode != 0 and f"plain_train.jsonl:{n}:" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_torchrun_data_parallel(trained, tmp_path):
    """Two CPU ranks (gloo): gradients averaged by hand, checkpoints from rank 0."""
    data, _ = trained
    out = str(tmp_path / "out")
    def torchrun(script, *args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    for script, args in (("sft.py", [f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", *TINY]),
                         ("rl.py", rl_args(out, "--total_iters=1"))):
        p = torchrun(script, *args)
        assert p.returncode == 0, p.stderr[:4000]  # the ranks' own messages come first, torchrun's summary last
    assert len(log_records(os.path.join(out, "rl", "log.jsonl"))) == 1
    for ckpt_dir in ("sft_plain", "rl"):  # each rank's random streams, to resume them
        rng = torch.load(os.path.join(out, ckpt_dir, "ckpt.pt"), weights_only=True)["rng"]
        assert len(rng) == 2 and rng[0]["python"] != rng[1]["python"]
    p = torchrun("sft.py", f"--data_dir={data}", f"--out_dir={out}", "--role=plain", "--init_from=resume",
                 "--max_iters=4", *TINY)
    assert p.returncode == 0 and "new stream" not in p.stdout, p.stderr[:4000]
    assert torch.load(os.path.join(out, "sft_plain", "ckpt.pt"), weights_only=True)["iter"] == 4


def test_restore_rng_per_rank():
    """Rank r continues the stream it saved; another rank count, or a checkpoint of one dict, draws anew."""
    states, expect = [], []
    for r in range(2):
        random.seed(r)
        torch.manual_seed(r)
        states += rng_states()
        expect.append((random.random(), torch.rand(1).item()))
    for r in range(2):
        random.seed(99)
        torch.manual_seed(99)
        restore_rng(states, 0, r, 2)
        assert (random.random(), torch.rand(1).item()) == expect[r]
    restore_rng(states[0], 0, 1, 2)  # the format before per-rank states, under two ranks
    old_format = random.random(), torch.rand(1).item()
    restore_rng(states, 0, 1, 3)  # two ranks saved, three resume
    other_world = random.random(), torch.rand(1).item()
    assert len({old_format, other_world, *expect}) == 4
