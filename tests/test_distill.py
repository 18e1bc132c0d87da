"""The KL objective: alignment by text token, zero KL for a student equal to the teacher, a falling loss, resume."""

import pytest
import torch

from kvcondense.checkpoint import read_log, read_meta
from kvcondense.data import load_split
from kvcondense.distill import aligned_rows, kl_to_teacher, teacher_logits
from kvcondense.forward import parallel_forward
from kvcondense.layout import Kind
from kvcondense.lora import LoraSettings, attach_lora
from kvcondense.methods import build_method
from kvcondense.models import add_special_tokens, load_model
from kvcondense.train import TrainConfig, objective_loss, prepare_model, text_blocks, train


@pytest.fixture(scope="module")
def blocks(tiny_dir, sample_path):
    _, tok = load_model(str(tiny_dir))
    return text_blocks(load_split(str(sample_path), "train"), tok, 64)


@pytest.mark.parametrize("name, params", [("full", {}), ("sentinel", {"ratio": 0.5, "min_line_words": 4}),
                                          ("gist", {"n_gist": 2}), ("streaming", {"ratio": 0.5})])  # fmt: skip
def test_every_text_prediction_is_aligned_with_the_teacher(tiny_dir, blocks, name, params):
    model, tok = load_model(str(tiny_dir))
    method = build_method(name, **params)
    token_ids = add_special_tokens(model, tok, method.special_tokens)
    lay = method.layout(blocks[0], token_ids, seed=1)
    student, teacher = aligned_rows(lay)
    raw = lay.input_ids[lay.kinds == Kind.TEXT]
    assert torch.equal(teacher, torch.arange(len(raw) - 1))  # every text token but the first, once, in order
    assert torch.equal(lay.targets[student], raw[1:])  # the student predicts the same token there
    if name == "sentinel":
        assert bool((lay.kinds[student] != Kind.TEXT).any()) or len(student) == len(raw) - 1


def test_a_student_equal_to_the_teacher_has_zero_kl(tiny_dir, blocks):
    model, tok = load_model(str(tiny_dir))
    method = build_method("sentinel", ratio=0.5, min_line_words=4)
    token_ids = add_special_tokens(model, tok, method.special_tokens)
    model = attach_lora(model, LoraSettings(dropout=0.0), list(token_ids.values()))  # B = 0: the identity
    model.eval()
    full = build_method("full")
    layouts = [full.layout(b, token_ids) for b in blocks[:2]]
    with torch.no_grad():
        student = parallel_forward(model, layouts).logits
        kl, n = kl_to_teacher(student, teacher_logits(model, layouts), layouts)
    assert n == sum(lay.n_text - 1 for lay in layouts)
    assert float(kl) / n < 1e-5
    sentinel_layouts = [method.layout(b, token_ids, seed=0) for b in blocks[:2]]
    with torch.no_grad():  # compression does change the predictions: the KL sees it
        student = parallel_forward(model, sentinel_layouts).logits
        kl_c, _ = kl_to_teacher(student, teacher_logits(model, sentinel_layouts), sentinel_layouts)
    assert float(kl_c) > 100 * float(kl)


def config(tiny_dir, sample_path, out, **kw) -> TrainConfig:
    base = dict(
        method="sentinel",
        method_params={"ratio": 0.5, "min_line_words": 4},
        model=str(tiny_dir),
        data=str(sample_path),
        out=str(out),
        steps=4,
        batch_size=2,
        block_tokens=64,
        lr=1e-2,
        save_every=0,
        objective="kl",
        lora=LoraSettings(dropout=0.0),
    )
    return TrainConfig(**{**base, **kw})


def test_the_kl_objective_fits_a_batch(tiny_dir, sample_path, tmp_path, blocks):
    """Gradient steps on the KL term alone drive the student towards the teacher on the batch they see."""
    from accelerate import Accelerator

    cfg = config(tiny_dir, sample_path, tmp_path / "unused")
    method = build_method("sentinel", **cfg.method_params)
    model, _, token_ids, _ = prepare_model(cfg, method)
    layouts = [method.layout(b, token_ids, seed=i) for i, b in enumerate(blocks[:2])]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    accelerator = Accelerator(cpu=True)
    kls = []
    for _ in range(25):
        loss, parts = objective_loss(model, layouts, cfg, accelerator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(parts["loss_kl"])
    assert parts["loss"] == pytest.approx(parts["loss_kl"])  # objective kl: the LM term is logged, not trained
    assert kls[-1] < 0.5 * kls[0], kls


def test_training_with_kl_logs_both_losses_and_resumes(tiny_dir, sample_path, tmp_path):
    cfg = config(tiny_dir, sample_path, tmp_path / "kl", objective="lm+kl", kl_weight=0.5, save_every=2)
    train(cfg)
    log = read_log(cfg.out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert r["loss"] == pytest.approx(r["loss_lm"] + 0.5 * r["loss_kl"], abs=2e-5)
    assert read_meta(cfg.out)["training"]["objective"] == "lm+kl"
    longer = config(tiny_dir, sample_path, tmp_path / "kl", objective="lm+kl", kl_weight=0.5, save_every=2, steps=6)
    train(longer, resume=True)
    assert [r["step"] for r in read_log(cfg.out)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="objective"):  # resuming with another objective is refused
        train(config(tiny_dir, sample_path, tmp_path / "kl", objective="kl", steps=8), resume=True)


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective"):
        TrainConfig(objective="mse")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_chunked_kl_and_its_gradient_equal_autograd_on_the_plain_formula(blocks, temperature, monkeypatch):
    """The fused KL (gradient written chunk by chunk in the forward pass) against the textbook expression
    differentiated by autograd, on random logits over rows that span several chunks."""
    import torch.nn.functional as F

    from kvcondense import distill
    from kvcondense.methods import Sentinel

    monkeypatch.setattr(distill, "KL_CHUNK", 7)  # several chunks, the last one short
    torch.manual_seed(0)
    layouts = [Sentinel(ratio=0.5, min_line_words=4).layout(b, {"<CL>": 1, "<CR>": 2}, seed=i)
               for i, b in enumerate(blocks[:2])]  # fmt: skip
    length, vocab = max(len(lay) for lay in layouts), 11
    student = torch.randn(2, length, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, max(lay.n_text for lay in layouts), vocab, dtype=torch.float64)
    kl, n = kl_to_teacher(student, teacher, layouts, temperature)
    kl.backward()
    fused = student.grad.clone()
    student.grad = None
    ref = student.new_zeros(())
    for b, lay in enumerate(layouts):
        s, t = aligned_rows(lay)
        log_q = F.log_softmax(student[b, s] / temperature, -1)
        log_p = F.log_softmax(teacher[b, t] / temperature, -1)
        ref = ref + (log_p.exp() * (log_p - log_q)).sum() * temperature**2
    ref.backward()
    assert n == sum(len(aligned_rows(lay)[0]) for lay in layouts) > 2 * 7
    assert torch.allclose(kl.double(), ref, rtol=1e-5)  # the chunks compute in float32
    assert torch.allclose(fused, student.grad, atol=1e-6)
    assert float(fused.abs().sum()) > 0


def test_a_bf16_teacher_is_close_to_the_float32_one_and_trains(tiny_dir, sample_path, tmp_path, blocks):
    """--teacher-dtype bfloat16 runs the teacher under bf16 autocast: its targets differ from float32's by a little
    (not at all would mean autocast did nothing), a run with it trains and records it, and resuming with another
    teacher dtype is refused."""
    import torch.nn.functional as F

    model, tok = load_model(str(tiny_dir))
    method = build_method("sentinel", ratio=0.5, min_line_words=4)
    token_ids = add_special_tokens(model, tok, method.special_tokens)
    model = attach_lora(model, LoraSettings(dropout=0.0), list(token_ids.values()))
    layouts = [method.layout(b, token_ids, seed=0) for b in blocks[:2]]
    exact = F.log_softmax(teacher_logits(model, layouts).float(), -1)
    fast = F.log_softmax(teacher_logits(model, layouts, "bfloat16").float(), -1)
    kl = (exact.exp() * (exact - fast)).sum(-1).mean()
    assert 0 < float(kl) < 1e-2
    cfg = config(tiny_dir, sample_path, tmp_path / "bf16", teacher_dtype="bfloat16", steps=2, save_every=2)
    train(cfg)
    assert read_meta(cfg.out)["training"]["teacher_dtype"] == "bfloat16"
    assert all(r["loss_kl"] > 0 for r in read_log(cfg.out))
    with pytest.raises(ValueError, match="teacher_dtype"):
        train(config(tiny_dir, sample_path, tmp_path / "bf16", steps=4), resume=True)  # float32 now: refused
    with pytest.raises(ValueError, match="--teacher-dtype"):
        TrainConfig(teacher_dtype="float16")
