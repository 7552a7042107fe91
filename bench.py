"""
Speed of model.py against transformers with identical weights (GPT2LMHeadModel for GPT-2, LlamaForCausalLM
for the Llama family), in one run: forward tokens/s (no grad) and KV-cache sampling tokens/s (ours vs
`generate`); action scoring decisions/s, our one-pass `score_actions` against one forward pass per
action (the GLAM/TWOSOME way); the agent's step and the PPO update with LoRA on the top blocks only,
with and without the frozen trunk shared and kept (see `trunk`); and a ceiling: the torch.matmul
FLOP/s of the model's largest projection, (batch_size * seq_len, n_embd) x (n_embd, hidden), hidden
being GPT-2's mlp.c_fc width (4 * n_embd) or Llama's mlp.gate_proj/up_proj width (n_inner). The LM
head's vocabulary matrix is larger but is not what scoring runs; the forward benchmark's FLOPs do
count it (see `flops`).

    python bench.py                      # scratch, GPT-2 124M and SmolLM2-135M's shape, on CPU
    python bench.py --configs=xl --device=cuda --dtype=bfloat16
"""
import sys
import time

import torch

from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- config
configs = "scratch,124m,smollm2-135m"  # comma list from CONFIGS below
device = "cpu"
dtype = "float32"  # float32 | bfloat16 | float16
batch_size = 8
seq_len = 256  # forward, scoring and matmul benchmark length
prompt_len = 64  # sampling benchmark: prompt length and new tokens
new_tokens = 64
n_actions = 6  # scoring benchmark: actions per decision (taxi's 6)
action_tokens = 4  # tokens of each action's text in the one-forward-per-action way
lora_layers = 8  # trunk benchmark: LoRA r=16 on the top this many blocks (at most half the stack)
menu_tokens = 96  # trunk benchmark: tokens of the menu after the prompt and the sampled analysis
reps = 3  # timed repetitions (best is reported), after one warm-up

CONFIGS = {  # random weights of each shape
    "scratch": GPTConfig(),  # model.py's default scratch model
    "124m": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "xl": GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),
    "smollm2-135m": GPTConfig(family="llama", block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_embd=576,
                              n_kv_head=3, n_inner=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
}
for arg in sys.argv[1:]:
    if arg in ("-h", "--help"):
        block = open(__file__).read().split("# " + "-" * 77)[1].removeprefix(" config").split("\nCONFIGS")[0]
        print(f"{__doc__.strip()}\n\noptions, each --key=value (the defaults):{block.rstrip()}")
        sys.exit(0)
    key, _, val = arg.removeprefix("--").partition("=")
    if key not in globals() or key.startswith("_") or key in ("CONFIGS", "sys", "time", "torch", "GPT", "GPTConfig"):
        sys.exit(f"error: unknown option {arg} (known: configs, device, dtype, batch_size, seq_len, prompt_len, "
                 "new_tokens, n_actions, action_tokens, lora_layers, menu_tokens, reps)")
    globals()[key] = type(globals()[key])(val)


def best_time(fn):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def twins(cfg):
    """Our GPT and a transformers model of the same family with the same weights (GPT.to_hf)."""
    ours = GPT(cfg)
    dt = getattr(torch, dtype)
    return ours.to(device, dt).eval(), ours.to_hf().to(device, dt).eval()


def flops(model):
    """Forward FLOPs per token at seq_len, with the full vocabulary's logits: 2 per weight of the blocks
    (a multiply and an add), plus attention's q k^T and att v, 2 * seq_len * n_embd each per layer
    (counted over the whole length, PaLM's estimate, though causal attention needs half), plus the LM
    head, 2 * n_embd * vocab. Embedding look-ups, norms and the softmax are left out."""
    c = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if ".h." in n or ".layers." in n)
    return 2 * body + 2 * 2 * c.n_layer * seq_len * c.n_embd + 2 * c.n_embd * c.vocab_size


def per_action(model, prompts, actions):
    """The GLAM/TWOSOME way: one forward pass over prompt + action text for each action (B, k tokens),
    the sum of the action tokens' log-probs, normalised over the actions. -> (B, A) log-probs."""
    T = prompts.shape[1]
    sums = [model(torch.cat([prompts, a], 1))[:, T - 1:-1].log_softmax(-1).gather(-1, a[..., None]).sum((1, 2))
            for a in actions]  # each (B,)
    return torch.stack(sums, 1).float().log_softmax(-1)


def trunk(cfg):
    """The agent's step and PPO's update with adapters on the top blocks only. A reflection model and a
    policy on one random base: the step samples new_tokens of analysis for batch_size prompt_len-token
    prompts, then scores n_actions on prompt + analysis + menu_tokens, the policy's frozen blocks
    either over the whole prompt or only over the menu (`generate(keep=...)` + `extend_trunk`). The
    update is one forward and backward of `score_actions` on those prompts, either from the ids or
    from the frozen blocks' kept output (`trunk=`). -> (top blocks, step s, shared step s, update s,
    kept-trunk update s)."""
    top = min(lora_layers, cfg.n_layer // 2)
    cfg = GPTConfig(**{**cfg.__dict__, "lora_r": 16, "lora_layers": top})
    refl = GPT(cfg).to(device, getattr(torch, dtype)).eval()
    policy = GPT(cfg).to(device, getattr(torch, dtype)).eval()
    policy.load_state_dict(refl.state_dict())
    n = policy.frozen_blocks()
    g = torch.Generator(device=device)
    p = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len)).tolist()
    menu = torch.randint(0, cfg.vocab_size, (batch_size, menu_tokens)).tolist()
    labels = torch.randint(0, cfg.vocab_size, (batch_size, n_actions), device=device)
    admissible = torch.ones(batch_size, n_actions, dtype=torch.bool, device=device)

    def prompts(out):  # (B, T) ids, (B,) lengths: all the same length (no stop token while sampling)
        ids = torch.tensor([a + b + c for a, b, c in zip(p, out, menu)], device=device)
        return ids, torch.full((batch_size,), ids.shape[1], device=device)

    def step(shared):
        out = refl.generate(p, new_tokens, generator=g, keep=n if shared else 0)
        with torch.no_grad():
            if not shared:
                return policy.score_actions(*prompts(out), labels, admissible)
            out, kept = out
            ids, lengths = prompts(out)
            trunk = policy.extend_trunk(ids.tolist(), kept)  # the policy's frozen blocks over the menu only
            return policy.score_actions(ids, lengths, labels, admissible, trunk=trunk)

    ids, lengths = prompts(refl.generate(p, new_tokens, generator=g))
    with torch.no_grad():
        kept = policy.score_actions(ids, lengths, labels, admissible, keep_trunk=True)[2]

    def update(**trunk):
        logp, value = policy.score_actions(ids, lengths, labels, admissible, **trunk)
        (logp[:, 0].sum() + value.sum()).backward()

    return (top, best_time(lambda: step(False)), best_time(lambda: step(True)), best_time(update),
            best_time(lambda: update(trunk=kept)))


if __name__ == "__main__":
    print(f"torch {torch.__version__}, device {device}, dtype {dtype}, threads {torch.get_num_threads()}")
    print(f"\nForward: batch {batch_size} x {seq_len} tokens. Sampling: batch {batch_size}, {min(prompt_len, seq_len)}-token "
          f"prompt, {new_tokens} new tokens, KV cache.\n")
    print("| config | params | forward ours tok/s | forward HF tok/s | ratio | sample ours tok/s | HF generate tok/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows, trunk_rows = [], []  # the later tables' rows, printed after the first
    for name in configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"error: unknown config {name!r} (known: {', '.join(CONFIGS)})")
        torch.manual_seed(0)
        ours, hf = twins(CONFIGS[name])
        c, dt = ours.config, getattr(torch, dtype)
        x = torch.randint(0, c.vocab_size, (batch_size, seq_len), device=device)
        with torch.no_grad():
            f_ours = batch_size * seq_len / best_time(lambda: ours(x))
            f_hf = batch_size * seq_len / best_time(lambda: hf(x).logits)
        p = x[:, :prompt_len]
        g = torch.Generator(device=device)
        s_ours = batch_size * new_tokens / best_time(lambda: ours.generate(p.tolist(), new_tokens, generator=g))
        s_hf = batch_size * new_tokens / best_time(lambda: hf.generate(
            p, attention_mask=torch.ones_like(p), do_sample=True, top_k=0, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0))
        n = sum(q.numel() for q in ours.parameters()) / 1e6
        print(f"| {name} | {n:.1f}M | {f_ours:,.0f} | {f_hf:,.0f} | {f_ours / f_hf:.2f} "
              f"| {s_ours:,.0f} | {s_hf:,.0f} | {s_ours / s_hf:.2f} |", flush=True)

        # action scoring: every prompt is seq_len real tokens, every action admissible
        labels = torch.randint(0, c.vocab_size, (batch_size, n_actions), device=device)  # (B, A) label tokens
        texts = torch.randint(0, c.vocab_size, (n_actions, batch_size, action_tokens), device=device)  # (A, B, k)
        lengths = torch.full((batch_size,), seq_len, device=device)
        admissible = torch.ones(batch_size, n_actions, dtype=torch.bool, device=device)
        with torch.no_grad():
            d_one = batch_size / best_time(lambda: ours.score_actions(x, lengths, labels, admissible))
            d_each = batch_size / best_time(lambda: per_action(ours, x, texts))

        # the ceiling: the largest projection as one matmul, turned into tokens/s by flops()
        hidden = 4 * c.n_embd if c.family == "gpt2" else c.n_inner
        a = torch.randn(batch_size * seq_len, c.n_embd, device=device, dtype=dt)
        w = torch.randn(c.n_embd, hidden, device=device, dtype=dt)
        # ten products per timing: one takes a few ms here, too short to time alone
        gflops = 10 * 2 * a.shape[0] * c.n_embd * hidden / best_time(lambda: [a @ w for _ in range(10)]) / 1e9
        ceiling = gflops * 1e9 / flops(ours)
        rows.append(f"| {name} | {a.shape[0]}x{c.n_embd} @ {c.n_embd}x{hidden} | {gflops:,.1f} | {ceiling:,.0f} "
                    f"| {f_ours / ceiling:.2f} | {d_one:,.1f} | {d_each:,.1f} | {d_one / d_each:.1f} |")
        del ours, hf
        top, t_step, t_shared, t_update, t_kept = trunk(CONFIGS[name])
        trunk_rows.append(f"| {name} | {top} of {c.n_layer} | {t_step:.2f} | {t_shared:.2f} "
                          f"| {t_step / t_shared:.2f} | {t_update:.2f} | {t_kept:.2f} | {t_update / t_kept:.2f} |")

    print(f"\nCeiling: torch.matmul of the largest projection; forward FLOPs per token as in `flops`. Scoring: batch "
          f"{batch_size} of {seq_len}-token prompts, {n_actions} actions, {action_tokens} tokens each per action.\n")
    print("| config | matmul | matmul GFLOP/s | ceiling tok/s | forward ours of ceiling "
          "| one-pass decisions/s | per-action decisions/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))

    print(f"\nLoRA r=16 on the top blocks only. Step: batch {batch_size}, the reflection samples {new_tokens} tokens "
          f"after a {prompt_len}-token prompt, the policy scores {n_actions} actions on prompt + analysis + "
          f"{menu_tokens}-token menu. Update: one forward and backward of that scoring.\n")
    print("| config | adapted blocks | step s | step, shared trunk s | ratio "
          "| update s | update, kept trunk s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(trunk_rows))
