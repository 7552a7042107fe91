"""eval.py: the Wilson interval, the baselines, a tiny real method end to end, bad input, determinism, --plot,
--check."""
import json
import os
import subprocess
import sys

import pytest
import torch

import envs
import eval as evaluation  # not `eval`: that would shadow the builtin in this file
from model import GPT, GPTConfig, save_checkpoint, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"method", "success", "ci_low", "ci_high", "return", "dangerous", "steps", "episodes"}


def run(tmp_path, *args):
    # one thread: the models here are tiny, and two threads on a busy 2-core machine are ~100x slower
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--out_dir={tmp_path}", "--device=cpu", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def results(out_dir):
    with open(os.path.join(out_dir, "eval.json")) as f:
        return json.load(f)


def test_wilson_against_hand_computed():
    # 8 of 10: p = 0.8, z = 1.96, centre (0.8 + z^2/20) / (1 + z^2/10) = 0.7167,
    # half-width z / (1 + z^2/10) * sqrt(0.016 + z^2/400) = 0.2266
    lo, hi = evaluation.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert evaluation.wilson(0, 20)[0] == 0.0 and evaluation.wilson(20, 20)[1] == 1.0
    assert evaluation.wilson(20, 20)[0] == pytest.approx(0.8389, abs=1e-4)  # n / (n + z^2)


def test_baselines_on_empty_out_dir(tmp_path):
    p = run(tmp_path, "--episodes=20", "--stages=pickup")
    assert p.returncode == 0, p.stderr
    assert "skipping SFT:" in p.stdout and "| Oracle | 1.000" in p.stdout
    report = results(tmp_path)
    assert set(report) == {"env", "config", "stages"} and report["env"] == "taxi"
    assert list(report["stages"]) == ["pickup"]
    for stage in report["stages"].values():
        assert stage["test_tasks"] == len(envs.make_env("taxi", "pickup").tasks("test")) > 0
        rows = {r["method"]: r for r in stage["results"]}
        assert list(rows) == ["Random", "Oracle"] and all(set(r) == ROW_KEYS for r in rows.values())
        assert rows["Oracle"]["success"] == 1.0 and rows["Oracle"]["dangerous"] == 0.0
        assert rows["Random"]["success"] < rows["Oracle"]["success"]
        assert rows["Random"]["ci_low"] <= rows["Random"]["success"] <= rows["Random"]["ci_high"]
        assert all(r["episodes"] == 20 for r in rows.values())
        # each method's wins per episode, which add up to its success rate
        assert list(stage["wins"]) == ["Random", "Oracle"] and stage["wins"]["Oracle"] == [1] * 20
        assert sum(stage["wins"]["Random"]) == round(rows["Random"]["success"] * 20)
    assert not os.path.exists(tmp_path / "eval.json.tmp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained scratch checkpoint, used as policy and as reflection model."""
    texts = []
    for stage in envs.DangerousTaxi.stages:
        taxi = envs.make_env("taxi", stage)
        for task in taxi.tasks("train")[:10]:
            obs = taxi.reset(task)
            texts += [envs.policy_prompt(obs, taxi.actions, "The taxi should move north.")]
    tok = train_tokenizer(texts, 300, envs.LABELS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=512, vocab_size=tok.get_vocab_size()))
    d = tmp_path_factory.mktemp("tiny")
    save_checkpoint(str(d), model, tok, "scratch")
    return d


def run_tiny(out_dir, ckpt, *args):
    return run(out_dir, f"--methods=tiny={ckpt}+{ckpt},tiny plain={ckpt}", "--episodes=6", "--batch_size=4",
               "--stages=pickup,dropoff", "--reflection_max_tokens=8", *args)


def test_tiny_method_runs_and_is_deterministic(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for out in (a, b):
        p = run_tiny(out, tiny)
        assert p.returncode == 0, p.stderr
    ra, rb = results(a), results(b)
    for stage in ("pickup", "dropoff"):
        rows = ra["stages"][stage]["results"]
        assert [r["method"] for r in rows] == ["Random", "tiny", "tiny plain", "Oracle"]
        for r in rows:
            assert 0 <= r["ci_low"] <= r["success"] <= r["ci_high"] <= 1 and 0 <= r["dangerous"] <= 1
            assert r["episodes"] == 6 and 1 <= r["steps"] <= envs.DangerousTaxi.default_horizon
        assert rows == rb["stages"][stage]["results"]  # same seed, same numbers
    assert ra["config"]["methods"] == f"tiny={tiny}+{tiny},tiny plain={tiny}"


def test_transcripts_record_every_step_and_change_no_number(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert run_tiny(a, tiny).returncode == 0
    p = run_tiny(b, tiny, "--transcripts")
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(a / "transcripts.jsonl")
    ra, rb = results(a), results(b)
    assert ra["stages"] == rb["stages"]
    with open(b / "transcripts.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [(t["stage"], t["method"], t["episode"]) for t in lines] == [
        (s, m, k) for s in ("pickup", "dropoff") for m in ("Random", "tiny", "tiny plain", "Oracle") for k in range(6)]
    taxi = envs.make_env("taxi", "pickup")
    for t in lines:
        steps = t["steps"]
        assert t["success"] == bool(rb["stages"][t["stage"]]["wins"][t["method"]][t["episode"]])
        assert 1 <= len(steps) <= envs.DangerousTaxi.default_horizon
        assert all(s["observation"] and s["action"] in taxi.actions and s["oracle"] in taxi.actions for s in steps)
        assert all((s["analysis"] is None) == (t["method"] != "tiny") for s in steps)
        if t["method"] == "Oracle":
            assert all(s["action"] == s["oracle"] for s in steps) and t["success"]
        if t["success"]:
            assert steps[-1]["reward"] > 0
    first = next(t for t in lines if t["method"] == "Oracle" and t["stage"] == "pickup" and t["episode"] == 0)
    taxi.reset(first["task"], seed=0)
    assert first["steps"][0]["observation"] == taxi.observation  # episode k starts from test task k


@pytest.mark.parametrize("args, message", [
    (["--no_such_key=1"], "error: unknown option --no_such_key=1"),
    (["--episodes=many"], "error: --episodes wants a int"),
    (["--env=chess"], "error: unknown environment 'chess'"),
    (["--stages=nowhere"], "error: unknown stage 'nowhere'"),
    (["--methods=a=out/x,a=out/y"], "error: --methods names a method twice"),
    (["--methods=Oracle=out/x"], "error: --methods names a method twice"),
])
def test_bad_options_fail_in_one_line(tmp_path, args, message):
    p = run(tmp_path, *args)
    assert p.returncode != 0 and p.stderr.strip().startswith(message) and len(p.stderr.strip().splitlines()) == 1


def test_named_missing_or_corrupt_checkpoint_is_an_error(tiny, tmp_path):
    missing = tmp_path / "nothing_here"
    p = run(tmp_path, f"--methods=x={missing}", "--episodes=2")
    assert p.returncode == 1 and p.stderr.startswith("error:") and str(missing) in p.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(os.urandom(256))
    p = run(tmp_path, f"--methods=x={tiny}+{corrupt}", "--episodes=2")  # a bad reflection model counts too
    assert p.returncode == 1 and p.stderr.startswith("error:") and str(corrupt) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "eval.json")


def test_plot_draws_the_rl_curves(tmp_path):
    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    lines = [{"config": {"env": "taxi"}}]
    lines += [{"iter": i, "env_steps": 640 * i, "success": i / 10, "stage": "pickup" if i < 5 else "dropoff"}
              for i in range(1, 10)]
    (run_dir / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"iter\": 10, \"succ")
    (tmp_path / "sft_policy").mkdir()  # an SFT log has iterations but no success: not a curve
    (tmp_path / "sft_policy" / "log.jsonl").write_text(json.dumps({"iter": 250, "train_loss": 1.0}) + "\n")
    p = run(tmp_path, "--plot")
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "eval.json").exists()  # --plot draws, it does not evaluate
    png = tmp_path / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def val_records(path, rows):
    """A validation file of data_gen.py's shape: rows of (stage, prompt, completion, negative)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for stage, prompt, completion, negative in rows:
            f.write(json.dumps({"prompt": prompt, "completion": completion, "stage": stage, "negative": negative,
                                "state": ""}) + "\n")


def reflection_records(path, teacher_steps):
    val_records(path, [(stage, f"state {i}\n # Analyze:\n", f"Some analysis. Next: {step}", negative)
                       for i, (stage, step, negative) in enumerate(teacher_steps)])


def test_check_counts_agreement(tiny, tmp_path, monkeypatch):
    """Stand-ins: a reflection model that always advises 'move north.' and a policy that always puts
    the most probability on the first line of the menu. The check must count exactly the records
    where the teacher says the same, per stage, after detours and per teacher answer, and read each
    record's labels from its own menu (here permuted)."""
    from model import load_checkpoint
    _, tok, _ = load_checkpoint(str(tiny), "cpu")

    class AlwaysNorth:
        config = GPTConfig(block_size=512)

        def eval(self):
            return self

        def generate(self, prompts, max_new, temperature, stop, generator, keep=0):
            return [tok.encode(" It is clear. Next: move north.", add_special_tokens=False).ids for _ in prompts]

    class FirstLine(AlwaysNorth):
        def score_actions(self, idx, lengths, label_ids, action_mask):
            logits = torch.full(label_ids.shape, -5.0)
            logits[:, 0] = 0.0
            return torch.log_softmax(logits, -1), torch.zeros(len(idx))

    steps = [("pickup", "move north.", False)] * 3 + [("pickup", "pick up.", True)] * 2 + [("full", "move north.", True)]
    reflection_records(tmp_path / "data" / "taxi" / "reflection_val.jsonl", steps)
    actions = ["move north", "move south", "pick up"]
    menu = lambda labels: envs.policy_prompt("obs", actions, "Next: x.", labels)
    val_records(tmp_path / "data" / "taxi" / "policy_val.jsonl", [
        ("pickup", menu("210"), "2", False), ("pickup", menu("012"), "0", True),  # teacher: move north, twice
        ("pickup", menu("120"), "0", False), ("full", menu("012"), "1", True),  # teacher: pick up; move south
        ("full", envs.policy_prompt("obs", [f"wait {i}" for i in range(20)], "Next: x.", envs.LABELS), "0", False)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda d, dev: ((AlwaysNorth if d == "r1" else FirstLine)(), tok, None))
    for key, val in {"stage_list": ["pickup", "full"], "dev": "cpu", "out_dir": str(tmp_path / "out"), "episodes": 100,
                     "batch_size": 2}.items():
        monkeypatch.setattr(evaluation, key, val, raising=False)
    evaluation.check_models([("x", "p", "r1")], "data/taxi", torch.Generator().manual_seed(0))
    report = json.loads((tmp_path / "out" / "check.json").read_text())
    rows = {(stage, r["teacher"]): (r["records"], r["agree"]) for stage, rs in report["reflection"]["r1"].items() for r in rs}
    assert rows[("pickup", "(all)")] == (5, 0.6) and rows[("pickup", "(after a detour)")] == (2, 0.0)
    assert rows[("pickup", "move north.")] == (3, 1.0) and rows[("pickup", "pick up.")] == (2, 0.0)
    assert rows[("full", "(all)")] == (1, 1.0) and rows[("full", "(after a detour)")] == (1, 1.0)
    assert report["policy"]["p"].pop("favourite_label") == {"label": "0", "records": 3, "of": 5}  # first lines: 2, 0, 1, 0, 0
    assert report["policy"]["p"].pop("by_lines_below") == {"0-3": {"records": 4, "agree": 2}, "4-7": {"records": 0, "agree": 0},
                                                           "8-15": {"records": 0, "agree": 0}, "16+": {"records": 1, "agree": 1}}
    controls = report["policy"]["p"].pop("controls")  # the first line, whatever the analysis says: 3 of 5 as with it
    assert controls["analysis left out"] == {"records": 5, "agree": 3} and controls["lines shuffled"]["records"] == 5
    rows = {(stage, r["teacher"]): (r["records"], r["agree"]) for stage, rs in report["policy"]["p"].items() for r in rs}
    assert rows[("pickup", "(all)")] == (3, 2 / 3) and rows[("pickup", "(after a detour)")] == (1, 1.0)
    assert rows[("pickup", "move north")] == (2, 1.0) and rows[("pickup", "pick up")] == (1, 0.0)
    assert rows[("full", "(all)")] == (2, 0.5) and rows[("full", "move south")] == (1, 0.0) and rows[("full", "wait 0")] == (1, 1.0)


def test_reflection_alone_takes_the_named_action(tiny, monkeypatch):
    """`name=+reflection_dir`: the action whose text is the analysis's Next: step; a random one when no
    action has that text (here the sampled text names none in every other env)."""
    from model import load_checkpoint
    _, tok, _ = load_checkpoint(str(tiny), "cpu")
    said = iter(["Next: pick up.", "Next: fly away.", "Clear. Next: move west.", "no step at all"] * 50)

    class Scripted:
        config = GPTConfig(block_size=512)

        def eval(self):
            return self

        def generate(self, prompts, max_new, temperature, stop, generator, keep=0):
            return [tok.encode(" " + next(said), add_special_tokens=False).ids for _ in prompts]

    monkeypatch.setattr(evaluation, "load_checkpoint", lambda d, dev: (Scripted(), tok, None))
    monkeypatch.setattr(evaluation, "dev", "cpu", raising=False)
    agent = evaluation.load_agent("follow", "", "r", {})
    assert agent["kind"] == "follow" and "policy" not in agent
    batch = [envs.make_env("taxi", "pickup") for _ in range(200)]
    for k, e in enumerate(batch):
        e.reset(e.tasks("test")[k % len(e.tasks("test"))], seed=k)
    chosen, _ = evaluation.act(agent, batch, torch.Generator().manual_seed(0))
    assert all(a == batch[0].actions.index("pick up") for a in chosen[0::4])
    assert all(a == batch[0].actions.index("move west") for a in chosen[2::4])
    unnamed = chosen[1::4] + chosen[3::4]
    assert set(unnamed) == set(range(len(batch[0].actions)))  # random over every action


def test_rare_answers_are_counted_by_their_first_word():
    recs = [{"negative": False}] * 40
    taught = ["cd .."] * 20 + [f"cat f{i}.py" for i in range(20)]
    hits = [True] * 20 + [i % 2 == 0 for i in range(20)]
    rows = {r["teacher"]: (r["records"], r["agree"]) for r in evaluation.report_rows("s", hits, recs, taught)}
    assert rows == {"(all)": (40, 0.75), "(after a detour)": (0, 0.0), "cd ..": (20, 1.0), "cat <other>": (20, 0.5)}


def test_check_runs_and_reports_missing_data(tiny, tmp_path):
    p = run(tmp_path, f"--methods=tiny={tiny}+{tiny}", "--check")
    assert p.returncode == 1 and p.stderr.startswith("error: no validation data at data/taxi/reflection_val.jsonl")
    reflection_records(tmp_path / "data" / "taxi" / "reflection_val.jsonl", [("pickup", "move north.", False)] * 3)
    val_records(tmp_path / "data" / "taxi" / "policy_val.jsonl",
                [("pickup", envs.policy_prompt("obs", ["move north", "pick up"], "Next: pick up."), "1", False)])
    (tmp_path / "data" / "taxi" / "plain_val.jsonl").write_text("{not json\n")
    p = run(tmp_path, f"--methods=tiny={tiny}+{tiny}", "--check", "--reflection_max_tokens=8")
    assert p.returncode == 0, p.stderr
    assert "| pickup | 3 | (all) |" in p.stdout and "| pickup | 1 | (all) |" in p.stdout
    assert not (tmp_path / "eval.json").exists()
    assert set(json.loads((tmp_path / "check.json").read_text())["policy"]) == {str(tiny)}
    p = run(tmp_path, f"--methods=gone={tmp_path / 'gone'}", "--check")
    assert p.returncode == 1 and p.stderr.startswith("error: no checkpoint at")
    p = run(tmp_path, f"--methods=plain={tiny}", "--check")  # a policy without reflection reads plain_val.jsonl
    assert p.returncode == 1 and p.stderr.startswith("error: data/taxi/plain_val.jsonl:1 is not a data_gen.py record")
