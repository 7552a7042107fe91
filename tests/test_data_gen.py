"""data_gen.py: determinism, targets always the oracle's, negative examples where (and only where) wanted."""
import json
import os
import re
import subprocess
import sys

import pytest

import data_gen
import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("reflection", "policy", "plain")
OPPOSITE = {"south": "north", "north": "south", "east": "west", "west": "east"}


def small(out_dir, seed=0, **kw):
    return data_gen.generate("taxi", str(out_dir), episodes=40, val_episodes=8, neg_prob=0.3, seed=seed, **kw)


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return out, small(out)


def test_same_seed_same_bytes(data, tmp_path):
    out, meta = data
    small(tmp_path / "again")
    small(tmp_path / "other", seed=1)
    names = sorted(n for n in os.listdir(out) if n.endswith(".jsonl"))
    assert len(names) == 12 and names == sorted(meta["counts"])
    for name in names:
        with open(out / name, "rb") as a, open(tmp_path / "again" / name, "rb") as b:
            assert a.read() == b.read(), name
    # meta.json differs only in the time it took and the directory
    metas = [json.loads(path.read_text()) for path in (out / "meta.json", tmp_path / "again" / "meta.json")]
    for m in metas:
        del m["seconds"], m["config"]["out_dir"]
    assert metas[0] == metas[1]
    other = tmp_path / "other" / "reflection_train.jsonl"
    assert (out / "reflection_train.jsonl").read_bytes() != other.read_bytes()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_every_target_is_the_oracle_action(data):
    out, meta = data
    for name, count in meta["counts"].items():
        records = load(out / name)
        assert len(records) == count > 0
        for r in records:
            taxi = envs.make_env("taxi", r["stage"])
            taxi.reset(r["state"])
            best = taxi.oracle()
            if name.startswith("reflection"):
                assert r["prompt"] == envs.analyze_prompt(taxi.observation)
                assert r["completion"].endswith(f" Next: {taxi.actions[best]}.")
            else:
                assert r["completion"] == envs.LABELS[best]
                assert r["prompt"].startswith(taxi.observation + "\n")


def test_policy_prompt_carries_the_reflection_of_its_state(data):
    out, _ = data
    reflections = {}
    for r in load(out / "reflection_train.jsonl"):
        reflections.setdefault(r["prompt"], set()).add(r["completion"])
    for r in load(out / "policy_train.jsonl"):
        obs, rest = r["prompt"].split("\n # Analyze:\n")
        assert rest.split("\n# Choose from below your action:\n")[0] in reflections[envs.analyze_prompt(obs)]


def test_negative_examples(data):
    out, meta = data
    for name in meta["counts"]:
        n_negative = sum(r["negative"] for r in load(out / name))
        assert (n_negative == 0) if "_pos_" in name else (n_negative > 0), name
        assert meta["negative_counts"][name] == n_negative
    for r in load(out / "reflection_train.jsonl"):
        if not r["negative"]:
            continue
        # the first sentence names the wrong move; undoing it must bring the taxi one step closer,
        # so it really was a detour (a wall bump would change nothing and could not be undone)
        first = r["completion"].split(". ")[0]
        assert re.search(r"detour|mistake|wrong|away", first)
        target = "destination" if envs.decode(r["state"])[2] == envs.IN_TAXI else "passenger"
        assert target in first
        moved = re.search(r"move (south|north|east|west)", first).group(1)
        taxi = envs.make_env("taxi", r["stage"])
        back, _, _ = envs.taxi_transition(r["state"], taxi.actions.index("move " + OPPOSITE[moved]))
        assert back != r["state"] and taxi.distance(back) == taxi.distance(r["state"]) - 1


def test_negatives_only_recover(data):
    # a policy record is negative only right after a detour, and the train file has fewer policy
    # than reflection records by exactly the detour steps, whose wrong action is never a target
    out, meta = data
    c, n = meta["counts"], meta["negative_counts"]
    assert c["reflection_train.jsonl"] - c["policy_train.jsonl"] == n["reflection_train.jsonl"]
    assert c["policy_train.jsonl"] == c["plain_train.jsonl"]
    assert c["reflection_pos_train.jsonl"] == c["policy_pos_train.jsonl"]


def test_shuffled_labels(tmp_path):
    small(tmp_path, shuffle_labels=True)
    seen = set()
    for r in load(tmp_path / "policy_train.jsonl"):
        labels = envs.parse_menu(r["prompt"])[0]
        assert sorted(labels) == list(envs.LABELS[:6])
        taxi = envs.make_env("taxi", r["stage"])
        taxi.reset(r["state"])
        assert r["completion"] == labels[taxi.oracle()]
        seen.add("".join(labels))
    assert len(seen) > 1


def test_cli_errors(tmp_path):
    def run(*args):
        cmd = [sys.executable, "data_gen.py", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    for args, message in [(["--foo=1"], "unknown option --foo (known: env, env_options, out_dir"),
                          (["--episodes=many"], "--episodes wants an integer, got 'many'"),
                          (["--shuffle_labels=maybe"], "--shuffle_labels wants true or false"),
                          (["episodes=3"], "use --key=value"),
                          (["--env=chess", f"--out_dir={tmp_path}"], "unknown environment 'chess'"),
                          (["--made_up_food=2", f"--out_dir={tmp_path}"], "made_up_food must be in [0, 1], got 2.0"),
                          (["--made_up_food=0.5", f"--out_dir={tmp_path}"], "household cooking games only")]:
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)
    config = data_gen.parse_overrides(["--neg_prob=1", "--shuffle_labels=true"], {"neg_prob": 0.1, "shuffle_labels": False})
    assert config == {"neg_prob": 1.0, "shuffle_labels": True}
