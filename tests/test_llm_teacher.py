"""data_gen.py --teacher=llm against a chat-completions endpoint started here on 127.0.0.1, which answers
with canned analyses and, on demand, a 429, a 500, malformed JSON, silence, or a refused key."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")  # requirements-llm.txt

import data_gen  # noqa: E402
import envs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-7f3a9c1e5b2d"  # must appear in no file written and no message
SMALL = {"episodes": 4, "val_episodes": 2, "neg_prob": 0.5, "seed": 0}
FAST = {"llm_model": "canned", "llm_workers": 3, "llm_timeout": 0.3, "llm_retries": 3, "llm_backoff": 0.01}


def canned(messages):
    """The endpoint's analysis: right at once, except for the oracle's `pick up` (a wrong Next:, then
    right when corrected) and its `drop off` (always wrong, so the template's reflection stays)."""
    user = messages[1]["content"]
    best, want = re.search(r"^Best action: (.*)$", user, re.M)[1], re.search(r"^Last line: (Next: .*)$", user, re.M)[1]
    if best == "drop off":
        return "Unload here.\nNext: pick up."
    if best == "pick up":
        return "Pick up the passenger. Next: drop off." if len(messages) == 2 else f"Corrected: pick up here. {want}"
    return f"Canned analysis of\nthe state.\n\n**{want}**"


class Endpoint(ThreadingHTTPServer):
    """POST /v1/chat/completions. Each request takes the next entry of `plan`, then `default`:
    "answer" (canned), "429", "500", "malformed" (not JSON), "slow" (past the client's timeout),
    "401" and "404" (with the key in their message, as some servers echo it)."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.plan, self.default, self.requests, self.lock = [], "answer", [], threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
            what = server.plan.pop(0) if server.plan else server.default
        status, payload = 200, None
        if what == "answer":
            payload = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": canned(body["messages"])}}]}
        elif what in ("401", "404", "429", "500"):
            status = int(what)
            payload = {"error": {"message": f"no ({self.headers['Authorization']})", "type": "test", "code": what}}
        elif what == "slow":
            time.sleep(1.0)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            data = b'{"choices": [{"mess' if payload is None else json.dumps(payload).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up waiting ("slow")
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = Endpoint()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def generate(out, url, **llm):
    return data_gen.generate("taxi", str(out), **SMALL, teacher="llm", llm={**FAST, "llm_base_url": url, **llm})


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_llm_reflections_cache_and_fallback(endpoint, tmp_path, capsys):
    out = tmp_path / "llm"
    endpoint.plan = ["429", "500", "malformed", "slow"]  # each costs its request one retry
    meta = generate(out, endpoint.url)
    llm = meta["llm"]
    assert not endpoint.plan and all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {KEY}"
                                     for r in endpoint.requests)
    assert llm["requests"] == len(endpoint.requests) and llm["cached"] == 0
    # nothing asked twice but the four that failed
    bodies = {json.dumps(r["body"], sort_keys=True) for r in endpoint.requests}
    assert len(bodies) == len(endpoint.requests) - 4

    # every reflection is the endpoint's (on one line, with the template's Next:) or, where its Next:
    # stayed wrong (drop off), the template's; the counts say which
    seen = {"accepted": 0, "corrected": 0, "template": 0}
    for name in [name for name in meta["counts"] if name.startswith("reflection")]:
        for r in load(out / name):
            taxi = envs.make_env("taxi", r["stage"])
            taxi.reset(r["state"])
            move = taxi.actions[taxi.oracle()]
            assert r["prompt"] == envs.analyze_prompt(taxi.observation)
            if move == "drop off":
                seen["template"] += 1
                assert r["completion"].endswith(" Next: drop off.") and "Unload" not in r["completion"]
            elif move == "pick up":
                seen["corrected"] += 1
                assert r["completion"] == "Corrected: pick up here. Next: pick up."
            else:
                seen["accepted"] += 1
                assert r["completion"] == f"Canned analysis of the state. Next: {move}."
    assert all(seen.values()) and seen == {k: llm[k] for k in seen}
    printed = capsys.readouterr()
    assert (f"{seen['accepted']} written at once, {seen['corrected']} after a correction, "
            f"{seen['template']} the template's") in printed.out

    # the policy reads the same reflections; the episodes are the template teacher's
    reflections = {}
    for r in load(out / "reflection_train.jsonl"):
        reflections.setdefault(r["prompt"], set()).add(r["completion"])
    for r in load(out / "policy_train.jsonl"):
        obs, rest = r["prompt"].split("\n # Analyze:\n")
        assert rest.split("\n" + envs.MENU_HEAD)[0] in reflections[envs.analyze_prompt(obs)]
    data_gen.generate("taxi", str(tmp_path / "template"), **SMALL)
    for name in meta["counts"]:
        mine, theirs = load(out / name), load(tmp_path / "template" / name)
        assert [r["state"] for r in mine] == [r["state"] for r in theirs]
        if name.startswith("plain"):
            assert mine == theirs
    assert not any("\0" in line for name in meta["counts"] for line in open(out / name))

    # what the endpoint was told: the observation, the actions, the best one, and after a detour the mistake
    firsts = [r["body"]["messages"] for r in endpoint.requests if len(r["body"]["messages"]) == 2]
    menu = "\n\nAdmissible actions:\nmove south\nmove north\nmove east\nmove west\npick up\ndrop off\n\nBest action: "
    assert all(menu in m[1]["content"] and "Observation:\n|" in m[1]["content"] for m in firsts)
    after = [m[1]["content"] for m in firsts if m[1]["content"].startswith("Previous observation:\n|")]
    mistake = r"made a mistake: it took 'move \w+' instead of '[a-z ]+', got reward -0.05"
    assert after and all(re.search(mistake, u) for u in after)
    fixes = [r["body"]["messages"] for r in endpoint.requests if len(r["body"]["messages"]) == 4]
    wrong = {"pick up": "Pick up the passenger. Next: drop off.", "drop off": "Unload here.\nNext: pick up."}
    assert {m[3]["content"].split("Next: ")[1].split(".")[0] for m in fixes} == set(wrong)
    assert all(m[2]["content"] == wrong[m[3]["content"].split("Next: ")[1].split(".")[0]] for m in fixes)

    # a second run asks nothing and writes the same bytes; the key is in no file and was never printed
    before = {name: (out / name).read_bytes() for name in meta["counts"]}
    n = len(endpoint.requests)
    again = generate(out, endpoint.url)
    assert len(endpoint.requests) == n and again["llm"]["requests"] == 0 and again["llm"]["cached"] == len(bodies)
    assert {name: (out / name).read_bytes() for name in meta["counts"]} == before
    assert {k: again["llm"][k] for k in seen} == seen
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) > 20 and not [f for f in files if KEY.encode() in open(f, "rb").read()]
    assert json.loads((out / "meta.json").read_text())["config"]["llm_model"] == "canned"
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err


def run(*args):
    cmd = [sys.executable, "data_gen.py", *args]  # with the key of api_key(), in the environment
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def script_args(out, url, **llm):
    settings = {**FAST, "llm_base_url": url, "llm_workers": 1, **llm}
    return [f"--out_dir={out}", "--teacher=llm", *(f"--{k}={v}" for k, v in {**SMALL, **settings}.items())]


def test_errors_are_one_line_and_the_cache_keeps_what_came(endpoint, tmp_path):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cache = tmp_path / "llm_cache"
    endpoint.plan, endpoint.default = ["answer"] * 5, "401"  # five answers, then the key is refused
    url = endpoint.url + "/"
    for base, default, extra, message in [
            (closed, "answer", [], f"cannot reach {closed}/ (--llm_base_url or $OPENAI_BASE_URL): is the server up?"),
            (endpoint.url, "401", [], f"{url} refused the API key (HTTP 401): check $OPENAI_API_KEY"),
            (endpoint.url, "404", [], f"{url} answered HTTP 404 for model 'canned': Error code: 404"),
            (endpoint.url, "500", ["--llm_retries=2"], f"{url} failed 3 times in a row, last with HTTP 500"),
            (endpoint.url, "slow", ["--llm_retries=1"], f"{url} failed 2 times in a row, last with no answer within 0.3 s")]:
        endpoint.default = default
        p = run(*script_args(tmp_path / "out", base), f"--llm_cache={cache}", *extra)
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(f"data_gen.py: {message}"), p.stderr
        assert len([line for line in p.stderr.splitlines() if line.startswith("data_gen.py")]) == 1
        assert KEY not in p.stdout + p.stderr
        assert not (tmp_path / "out").exists()  # no data file is written before every reflection is in
    assert len(os.listdir(cache)) == 5  # what came before the refusal is kept
    p = run(*script_args(tmp_path / "out", endpoint.url), "--llm_model=")
    assert p.returncode == 2 and "--teacher=llm needs --llm_model=NAME" in p.stderr

    # resumed, the run asks only for the rest and writes what a run without a break writes
    endpoint.default = "answer"
    resumed = generate(tmp_path / "out", endpoint.url, llm_cache=str(cache))
    assert resumed["llm"]["cached"] == 5 and resumed["llm"]["requests"] > 0
    whole = generate(tmp_path / "whole", endpoint.url)
    assert whole["llm"]["requests"] == resumed["llm"]["requests"] + 5
    for name in whole["counts"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_template_teacher_needs_no_openai(tmp_path):
    code = (f"import sys, data_gen; data_gen.generate('taxi', {str(tmp_path)!r}, 2, 1, 0.5, 0); "
            "assert 'openai' not in sys.modules, 'imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
