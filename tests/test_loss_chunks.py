"""model.cross_entropy (fp32 log-softmax one chunk of rows at a time) against the plain formula in fp64."""
import pytest
import torch
import torch.nn.functional as F

import model
from model import GPT, GPTConfig, cross_entropy


def plain_loss_and_grad(logits, targets, vocab_size):
    """-mean log softmax(logits[:, :vocab_size]) at the targets, and its gradient, by fp64 autograd."""
    leaf = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(leaf[..., :vocab_size].flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("chunk_rows", [7, 4096])  # 30 rows: 5 chunks with a short last one, or one chunk
def test_loss_and_gradient_equal_the_plain_formula(monkeypatch, chunk_rows):
    monkeypatch.setattr(model, "LOSS_CHUNK_ROWS", chunk_rows)
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 10, 64, generator=gen)).requires_grad_()  # (B, T, V padded)
    logits.data[..., 50:] = 1e4  # padding columns with huge values: any mass they took would show
    targets = torch.randint(0, 50, (3, 10), generator=gen)
    loss = cross_entropy(logits, targets, vocab_size=50)
    (2.5 * loss).backward()  # a non-unit upstream gradient must be carried through
    expected_loss, expected_grad = plain_loss_and_grad(logits, targets, 50)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected_loss.item()) < 1e-5 * expected_loss.item()
    assert torch.allclose(logits.grad.double(), 2.5 * expected_grad, rtol=0, atol=1e-7)
    assert (logits.grad[..., 50:] == 0).all()


def test_16_bit_logits_keep_their_dtype_and_no_fp32_copy_of_all_of_them_is_saved(monkeypatch):
    monkeypatch.setattr(model, "LOSS_CHUNK_ROWS", 8)
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 16, 128, generator=gen)).half().requires_grad_()
    targets = torch.randint(0, 128, (4, 16), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = cross_entropy(logits, targets, vocab_size=128)
    loss.backward()
    fp32_elements = sum(t.numel() for t in saved if t.dtype == torch.float32)
    assert fp32_elements < logits.numel() // 10  # one log-sum-exp per row, not (B·T, V) fp32 probabilities
    expected_loss, expected_grad = plain_loss_and_grad(logits, targets, 128)  # same fp16 values, fp64 math
    assert abs(loss.item() - expected_loss.item()) < 1e-5 * expected_loss.item()
    assert logits.grad.dtype == torch.float16
    assert torch.allclose(logits.grad.double(), expected_grad, rtol=1e-3, atol=1e-6)  # fp16 rounding of the grad


def test_the_models_loss_is_the_plain_formula_of_its_logits():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)).eval()
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    logits, none = gpt(idx)
    none_logits, loss = gpt(idx, targets)
    assert none is None and none_logits is None  # training gets the loss alone
    expected = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    assert abs(loss.item() - expected.item()) < 1e-5
