import copy

import pytest
import torch

from trainer.config import ModelConfig
from trainer.model import Transformer, cross_entropy, flops_per_token, param_count

SHAPES = {
    "llama-gqa": ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16),
    "llama-mha-tied": ModelConfig(
        vocab_size=97, d_model=64, n_layers=3, n_heads=4, max_seq_len=16, tie_embeddings=True
    ),
    "gpt2": ModelConfig(arch="gpt2", vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=16),
}


@pytest.mark.parametrize("name", SHAPES)
def test_parameter_count_matches_closed_form(name):
    cfg = SHAPES[name]
    model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())  # shared tensors are yielded once
    assert counted == param_count(cfg)


def test_known_llama_7b_count():
    # LLaMA-7B: 6,738,415,616 parameters (Touvron et al. 2023; the HF checkpoint's count).
    cfg = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048)
    assert param_count(cfg) == 6_738_415_616


def test_known_gpt2_small_count():
    # GPT-2 small with tied embeddings: 124,439,808 parameters (HF gpt2).
    cfg = ModelConfig(
        arch="gpt2",
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        max_seq_len=1024,
        tie_embeddings=True,
    )
    assert param_count(cfg) == 124_439_808


@pytest.mark.parametrize("name", SHAPES)
def test_causal(name):
    torch.manual_seed(0)
    cfg = SHAPES[name]
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])  # earlier positions bit-identical
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # the changed token does matter downstream


@pytest.mark.parametrize("name", SHAPES)
def test_one_adamw_step_lowers_loss(name):
    torch.manual_seed(0)
    cfg = SHAPES[name]
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 13))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = cross_entropy(model(x), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = cross_entropy(model(x), y)
    assert after < before - 0.05
    # a fresh model predicts close to uniform: loss ~ ln(V)
    assert abs(before.item() - torch.log(torch.tensor(97.0)).item()) < 0.3


def test_our_adamw_updates_exactly_as_torchs():
    """The optimizer the engine builds (torch's AdamW without its dynamo-importing step wrapper)
    leaves bit-identical weights to torch.optim.AdamW over steps with decay groups, and steps
    under grad mode as torch's does (in-place updates of leaves that require grad)."""
    from trainer.config import OptimConfig
    from trainer.engine import make_optimizer, param_groups
    from trainer.library_internals import AdamW

    cfg = SHAPES["llama-gqa"]
    o = OptimConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    models = [Transformer(cfg)]
    models.append(copy.deepcopy(models[0]))
    opts = [
        make_optimizer(models[0], o),
        torch.optim.AdamW(
            param_groups(models[1], o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
        ),
    ]
    assert type(opts[0]) is AdamW and type(opts[1]) is torch.optim.AdamW
    torch.manual_seed(1)
    for _ in range(3):
        idx = torch.randint(0, cfg.vocab_size, (4, 13))
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            cross_entropy(model(idx[:, :-1]), idx[:, 1:]).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert opts[0].state_dict()["state"][0]["step"] == 3


def test_tied_embeddings_share_storage():
    model = Transformer(SHAPES["llama-mha-tied"])
    assert model.head.out.weight is model.embed.tok.weight


def test_flops_per_token_palm_formula():
    # PaLM appendix B: 6N + 12*L*H*Q*T; N = non-embedding parameters incl. the output projection.
    cfg = SHAPES["llama-gqa"]
    n = param_count(cfg) - cfg.vocab_size * cfg.d_model
    assert flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 4 * 16 * 16
