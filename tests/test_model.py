"""model.py: parity with transformers, LoRA, action scoring, KV-cache sampling, tokenizers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, load_checkpoint, label_token_ids, save_checkpoint, train_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
LABELS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CORPUS = ["+---------+\n|R: | : :G|\n| : | : : |\n # Analyze:\nThe taxi is at row 2. Next: move south.\n"
          "# Choose from below your action:\nmove south (0)\nmove north (1)\n # Action:\n"] * 50


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400, labels=LABELS)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    """A small random GPT2LMHeadModel with a tokenizer, saved as a local Hugging Face directory."""
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("hf"))
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=48, n_layer=3, n_head=4)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    return d


def ids(tok, text):
    return tok.encode(text).ids


def test_hf_parity_logits_and_greedy(hf_dir, tok):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(hf_dir).eval()
    x = torch.tensor([ids(tok, CORPUS[0])[:40]])
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        want = hf.generate(x, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)[0, 40:].tolist()
    for use_cache in (True, False):
        got = model.generate([x[0].tolist()], 20, temperature=0, use_cache=use_cache)[0]
        assert got == want


def test_export_roundtrip(hf_dir, tok, tmp_path):
    model = GPT.from_pretrained(hf_dir, lora_r=4)
    for m in model.lora_layers():  # non-zero adapters, so the export must merge them
        torch.nn.init.normal_(m.lora_B, std=0.05)
    model.eval()
    model.export_hf(str(tmp_path), tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    x = torch.tensor([hf_tok(CORPUS[0][:200])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


def small(lora_r=0, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=400, n_layer=2, n_head=2, n_embd=32, lora_r=lora_r, **kw)).eval()


def test_lora_identity_merge_and_trainable():
    base = small()
    lora = small(lora_r=4)
    lora.load_state_dict(base.state_dict(), strict=False)
    x = torch.randint(0, 400, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(lora(x), base(x))  # B = 0 at init
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    for m in lora.lora_layers():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    before = {n: p.clone() for n, p in lora.state_dict().items()}
    with torch.no_grad():
        y = lora(x)
        for m in lora.lora_layers():
            m.merge()
        torch.testing.assert_close(lora(x), y, atol=1e-5, rtol=1e-5)  # merged == adapters on the side
        for m in lora.lora_layers():
            m.unmerge()
    for n, p in lora.state_dict().items():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    with torch.no_grad(), lora.adapters_disabled():
        torch.testing.assert_close(lora(x), base(x))
        assert not torch.allclose(lora(x), y)


def test_adapter_only_checkpoint_roundtrip(hf_dir, tok, tmp_path):
    model = GPT.from_pretrained(hf_dir, lora_r=4)
    for m in model.lora_layers():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    torch.nn.init.normal_(model.value_head.weight)
    save_checkpoint(str(tmp_path), model, tok, init_from=hf_dir)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["adapters_only"] and all("lora_" in k or k.startswith("value_head") for k in ckpt["model"])
    loaded, tok2, _ = load_checkpoint(str(tmp_path))
    x = torch.randint(0, tok.get_vocab_size(), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert tok2.encode(CORPUS[0]).ids == tok.encode(CORPUS[0]).ids
    with pytest.raises(ValueError):
        GPT.from_pretrained(hf_dir, lora_r=2).load_adapter_state_dict(ckpt["model"])


def test_score_actions_matches_full_softmax_and_ignores_padding():
    model = small()
    torch.nn.init.normal_(model.value_head.weight)
    prompts = [torch.randint(0, 400, (n,)) for n in (7, 12, 4)]
    labels = torch.tensor([[5, 9, 11, 13], [5, 9, 11, 13], [20, 21, 22, 23]])
    amask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]).bool()

    def batch(order, pad_to, chunk=16):
        idx = torch.zeros(len(order), pad_to, dtype=torch.long)
        for r, i in enumerate(order):
            idx[r, :len(prompts[i])] = prompts[i]
        lengths = torch.tensor([len(prompts[i]) for i in order])
        return model.score_actions(idx, lengths, labels[order], amask[order], chunk)

    with torch.no_grad():
        logp, value = batch([0, 1, 2], 12)
        for i, p in enumerate(prompts):  # full-vocab softmax at the last position, restricted, renormalised
            full = model(p[None])[0, -1].log_softmax(-1)[labels[i]]
            full = full.masked_fill(~amask[i], float("-inf"))
            torch.testing.assert_close(logp[i], full.log_softmax(-1), atol=1e-5, rtol=1e-5)
        logp2, value2 = batch([2, 0, 1], 20)  # other order, more padding
        torch.testing.assert_close(logp2, logp[[2, 0, 1]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value2, value[[2, 0, 1]], atol=1e-5, rtol=1e-5)
        logp3, value3 = batch([2, 0, 1], 20, chunk=2)  # chunks of prompts of similar length
        torch.testing.assert_close(logp3, logp[[2, 0, 1]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value3, value[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    assert torch.isinf(logp[1, 2]) and torch.isfinite(logp[1, :2]).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_frozen_trunk_kept_and_reused(family):
    """LoRA on the top block of two: the bottom block's output, kept at rollout, gives back the same
    log-probs, values and LoRA gradients when only the top block runs (as PPO's update does)."""
    model = small(lora_r=4, lora_layers=1, family=family, **({"n_inner": 64} if family == "llama" else {}))
    assert model.frozen_blocks() == 1 and small(lora_r=4).frozen_blocks() == 0 == small().frozen_blocks()
    for m in model.lora_layers():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    torch.nn.init.normal_(model.value_head.weight)
    prompts = [torch.randint(0, 400, (n,)) for n in (7, 12, 4)]
    idx = torch.zeros(3, 12, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = p
    lengths, labels = torch.tensor([7, 12, 4]), torch.tensor([[5, 9, 11]] * 3)
    amask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]).bool()

    def grads(**kw):
        model.zero_grad()
        logp, value, *kept = model.score_actions(idx, lengths, labels, amask, chunk=2, **kw)
        (logp[amask].sum() + value.sum()).backward()
        return logp.detach(), value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, kept

    logp, value, g, _ = grads()
    _, _, _, (trunk,) = grads(keep_trunk=True)
    assert [len(t) for t in trunk] == [7, 12, 4] and not any(t.requires_grad for t in trunk)
    logp2, value2, g2, _ = grads(trunk=trunk)
    torch.testing.assert_close(logp2, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value2, value, atol=1e-5, rtol=1e-5)
    assert g.keys() == g2.keys() and any("lora_B" in n for n in g)
    for n in g:
        torch.testing.assert_close(g2[n], g[n], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(grads(trunk=[t * 2 + torch.randn_like(t) for t in trunk])[0], logp)  # the trunk given is the one used


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reflection_state_extends_to_the_policy_trunk(family):
    """Two adapters on one base: the reflection model's state over its prompt and analysis, from
    generate(keep=...), starts the policy's frozen blocks, which then run on the rest of each prompt
    only; the result equals the policy's own pass, also where a prompt leaves the kept tokens early."""
    extra = {"n_inner": 64} if family == "llama" else {}
    policy, refl = (small(lora_r=4, lora_layers=1, family=family, **extra) for _ in range(2))
    for m in refl.lora_layers():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    assert policy.shares_trunk(refl) and refl.shares_trunk(policy)
    other = small(lora_r=4, lora_layers=1, family=family, **extra)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # the embedding: another base
    assert not policy.shares_trunk(other) and not small(lora_r=4, family=family, **extra).shares_trunk(refl)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 400, (n,)).tolist() for n in (7, 12, 4)]
    out, kept = refl.generate(prompts, 6, temperature=1.0, stop=[3], generator=g, keep=policy.frozen_blocks())
    assert out == refl.generate(prompts, 6, temperature=1.0, stop=[3], generator=torch.Generator().manual_seed(0))
    full = [p + o + torch.randint(0, 400, (5,)).tolist() for p, o in zip(prompts, out)]  # the menu after the analysis
    full[1][3] = (full[1][3] + 1) % 400  # this prompt leaves the kept tokens at its 4th token
    trunk = policy.extend_trunk(full, kept)
    idx = torch.zeros(3, max(map(len, full)), dtype=torch.long)
    for i, p in enumerate(full):
        idx[i, :len(p)] = torch.tensor(p)
    lengths, labels, amask = torch.tensor(list(map(len, full))), torch.tensor([[5, 9]] * 3), torch.ones(3, 2).bool()
    with torch.no_grad():
        logp, value, own = policy.score_actions(idx, lengths, labels, amask, keep_trunk=True)
        logp2, value2 = policy.score_actions(idx, lengths, labels, amask, trunk=trunk)
    for a, b in zip(trunk, own):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp2, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value2, value, atol=1e-5, rtol=1e-5)
    moved = policy.extend_trunk(full, [(i, x + 1, [(k + 1, v) for k, v in kv]) for i, x, kv in kept])
    assert all(not torch.allclose(a[-1], b[-1]) for a, b in zip(moved, trunk))  # the kept state is what was used


def test_left_padding_does_not_change_a_row():
    model = small()
    a, b = torch.randint(0, 400, (5,)), torch.randint(0, 400, (9,))
    idx = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), a]), b])
    attn = torch.stack([torch.cat([torch.zeros(4), torch.ones(5)]), torch.ones(9)])
    with torch.no_grad():
        out = model(idx, attn)
        torch.testing.assert_close(out[0, 4:], model(a[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(b[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=20), dict(temperature=1.0, top_p=0.9)])
def test_kv_cache_sampling_equals_no_cache(kw):
    model = small().double()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        runs.append(model.generate(prompts, 15, generator=g, use_cache=use_cache, **kw))
    assert runs[0] == runs[1] and all(len(r) == 15 for r in runs[0])


def test_stop_token_and_string(tok):
    model = small()
    g = torch.Generator().manual_seed(0)
    free = model.generate([[1, 2, 3]], 10, generator=g)[0]
    g = torch.Generator().manual_seed(0)
    assert model.generate([[1, 2, 3]], 10, generator=g, stop=[free[3]])[0] == free[:free.index(free[3])]
    text = tok.decode(free)
    g = torch.Generator().manual_seed(0)
    cut = model.generate([[1, 2, 3]], 10, generator=g, stop=[text[-2:]], tokenizer=tok)[0]
    assert text[-2:] not in tok.decode(cut) and text.startswith(tok.decode(cut))


def test_bpe_labels_single_tokens(tok):
    assert len(set(label_token_ids(tok, LABELS))) == len(LABELS)
    with pytest.raises(ValueError, match="single tokens"):
        label_token_ids(tok, ["0", "move south, then pick up"])


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(str(tmp_path))
