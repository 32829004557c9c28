"""Cross-entropy over a language-model head without materialising the full float32 logits.

HF causal LMs compute ``logits = hidden @ W^T`` for every token in bf16, upcast them to float32 and
keep the float32 log-softmax for backward: for 8192 tokens and a 32k vocabulary that is 0.5 GiB of
bf16 plus 2 GiB of float32. Here the rows go through in chunks: each chunk's logits are computed,
turned into (loss, d loss/d logits) in one pass that overwrites the logits buffer, and multiplied
back through the head right away. Since the loss is a scalar, the gradient with respect to hidden
(and W, when it trains) is complete at the end of forward; backward only scales it by the incoming
gradient. Peak extra memory is one chunk of bf16 logits.

`labels_forward` puts this under the ordinary `model(input_ids, labels=...)` of a wrapped causal
LM in training, so Trainer, TRL and plain loops get it without calling anything: the decoder runs,
the loss comes from its last hidden state here, and the output carries no logits (as Liger's and
unsloth's training forwards do). It applies only where the head is known to be a plain projection
(hf_compat's table), with Gemma-2's final-logit softcapping applied in the loss and Trainer's
`num_items_in_batch` as the divisor; anything else (hooks on the model such as soft prompts, MoE
router losses, logits asked for) takes the model's own forward.
"""

from __future__ import annotations

import contextlib

import torch

from .. import hf_compat
from ._backend import use_triton

__all__ = ["chunked_cross_entropy", "causal_lm_loss", "cross_entropy_reference", "labels_forward"]

# 64 MiB of bf16 logits per chunk: with block graphs the loss is where a step peaks outside the graphs'
# pool (a 1.1B step at 8k tokens: 250 MiB of logits at 256 MiB chunks), and more chunks cost a few launches
_CHUNK_LOGIT_ELEMENTS = 2**25


def _default_chunk_rows(vocab_size: int) -> int:
    return max(256, _CHUNK_LOGIT_ELEMENTS // vocab_size // 256 * 256)


def _loss_and_grad_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row loss; overwrites ``logits`` with softmax - onehot (zero on ignored rows)."""
    logits_f32 = logits.float()
    lse = torch.logsumexp(logits_f32, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    target_logit = logits_f32.gather(1, safe_labels[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0)
    grad = torch.exp(logits_f32.sub_(lse[:, None]))
    grad.scatter_add_(1, safe_labels[:, None], torch.full_like(grad[:, :1], -1.0))
    grad.mul_(valid[:, None])
    logits.copy_(grad)
    return loss


def _softcapped_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, cap: float) -> torch.Tensor:
    """As _loss_and_grad_torch on cap * tanh(logits / cap) (Gemma-2's final-logit softcapping);
    ``logits`` gets the gradient with respect to the raw logits (chain rule through the tanh)."""
    squashed = torch.tanh(logits.float() / cap)
    capped = squashed * cap
    loss = _loss_and_grad_torch(capped, labels, ignore_index)  # capped now holds d loss / d capped
    logits.copy_(capped.mul_(1.0 - squashed * squashed))
    return loss


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None = None) -> torch.Tensor:
    if use_triton(logits) and logits.is_contiguous():
        from ._triton_kernels import cross_entropy_rows

        return cross_entropy_rows(logits, labels, ignore_index, softcap)
    if softcap is not None:
        return _softcapped_loss_and_grad(logits, labels, ignore_index, softcap)
    return _loss_and_grad_torch(logits, labels, ignore_index)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows, softcap, divisor):
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        labels1d = labels.reshape(-1)
        rows = hidden2d.shape[0]
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight_c = weight.to(hidden.dtype)

        losses = torch.empty(rows, device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden2d) if need_hidden_grad else None
        # float32 accumulator: the head's gradient sums over every chunk
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight_grad else None
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            h = hidden2d[start:stop]
            logits = h @ weight_c.t()
            losses[start:stop] = _loss_and_grad(logits, labels1d[start:stop], ignore_index, softcap)
            if grad_hidden is not None:
                torch.mm(logits, weight_c, out=grad_hidden[start:stop])
            if grad_weight is not None:
                grad_weight += (logits.t() @ h).float()
            del logits

        # a batch with every label ignored gives 0/0 = nan, exactly like torch's mean cross-entropy;
        # a divisor (Trainer's num_items_in_batch over accumulated micro-batches) replaces the count
        valid_count = (labels1d != ignore_index).sum() if divisor is None else torch.as_tensor(divisor, device=losses.device)
        loss = losses.sum() / valid_count
        ctx.save_for_backward(grad_hidden, grad_weight, valid_count)
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, valid_count = ctx.saved_tensors
        scale = grad_loss / valid_count
        out_hidden = out_weight = None
        if grad_hidden is not None:
            out_hidden = (grad_hidden * scale.to(grad_hidden.dtype)).view(ctx.hidden_shape)
        if grad_weight is not None:
            out_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return out_hidden, out_weight, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
    divisor: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ lm_head_weight^T`` against ``labels`` over non-ignored rows.

    ``labels`` are aligned with ``hidden`` (row i of hidden predicts labels[i]): NO shift happens
    here; :func:`causal_lm_loss` does the causal shift. ``hidden`` is (..., H), ``labels`` (...).
    ``chunk_size`` rows go through at a time (default: 64 MiB of bf16 logits).
    ``softcap``: logits become softcap * tanh(logits / softcap) first (Gemma-2). ``divisor``: the
    summed loss is divided by it instead of by the count of labelled rows.
    Gradients flow to ``hidden`` and, if it requires grad, to ``lm_head_weight``.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    chunk_rows = chunk_size or _default_chunk_rows(lm_head_weight.shape[0])
    device_type = hidden.device.type
    if device_type == "meta":  # memory estimates run here; autocast has no meta device
        no_autocast = contextlib.nullcontext()
    else:
        if torch.is_autocast_enabled(device_type):  # the head's matmul in autocast's dtype, as the model's would be
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        no_autocast = torch.autocast(device_type, enabled=False)  # one dtype inside: buffers are written in place
    with no_autocast:
        return _ChunkedCrossEntropy.apply(hidden, lm_head_weight, labels, ignore_index, chunk_rows, softcap, divisor)


def cross_entropy_reference(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """What HF computes: full logits in the activations' dtype, upcast to float32, mean CE."""
    logits = (hidden @ lm_head_weight.to(hidden.dtype).t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index
    )


def _find_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Unwraps deltatune / peft wrappers (which expose the HF model as ``.model``) down to the *ForCausalLM."""
    current = model
    for _ in range(4):
        if getattr(current, "lm_head", None) is not None and hasattr(current, "get_decoder"):
            return current
        inner = getattr(current, "model", None)
        if not isinstance(inner, torch.nn.Module):
            break
        current = inner
    return model


def _plain_head_weight(causal_lm: torch.nn.Module) -> torch.Tensor | None:
    if not hasattr(causal_lm, "get_decoder"):
        return None
    if not hf_compat.has_plain_lm_head(causal_lm):
        return None
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None  # an adapted or biased head: let HF compute it
    return head.weight


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    **model_kwargs,
) -> torch.Tensor:
    """HF causal-LM loss (labels shifted by one inside, as HF does) through :func:`chunked_cross_entropy`.

    Works on an HF *ForCausalLM or any wrapper exposing it as ``.model``. Models whose head is not a
    plain bias-free ``nn.Linear`` of a known decoder fall back to ``model(..., labels=labels).loss``.
    """
    causal_lm = _find_causal_lm(model)
    if _plain_head_weight(causal_lm) is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs).loss
    decoder_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return _decoder_loss(causal_lm, decoder_kwargs, labels, ignore_index)[0]


def _decoder_loss(causal_lm: torch.nn.Module, decoder_kwargs: dict, labels: torch.Tensor, ignore_index: int = -100,
                  divisor: int | float | torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
    """(loss, decoder output): the decoder's last hidden state through the chunked loss."""
    out = causal_lm.get_decoder()(**decoder_kwargs)
    hidden = out.last_hidden_state
    # HF's shift: position t predicts token t+1; the last position predicts nothing
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(hidden.device)
    loss = chunked_cross_entropy(hidden, _plain_head_weight(causal_lm), shifted, ignore_index=ignore_index,
                                 softcap=hf_compat.final_logit_softcap(causal_lm), divisor=divisor)
    return loss, out


# Keywords of a causal LM's forward that its decoder does not take.
_HEAD_ONLY_KEYWORDS = ("labels", "num_items_in_batch", "logits_to_keep", "return_dict")


def labels_forward(model: torch.nn.Module, args: tuple, kwargs: dict) -> object | None:
    """`model(**kwargs)` of a causal LM in training with labels, computed with the chunked loss and
    no logits; None where that would not be exactly the model's own loss (see the module docstring)."""
    if args or kwargs.get("labels") is None or not torch.is_grad_enabled() or not model.training:
        return None
    if kwargs.get("return_dict") is False or kwargs.get("logits_to_keep") or kwargs.get("output_router_logits"):
        return None
    causal_lm = _find_causal_lm(model)
    if _plain_head_weight(causal_lm) is None or not hf_compat.loss_is_plain_cross_entropy(causal_lm):
        return None
    if causal_lm._forward_hooks or causal_lm._forward_pre_hooks:  # e.g. soft prompts rewrite inputs and labels
        return None
    decoder_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_KEYWORDS}
    loss, out = _decoder_loss(causal_lm, decoder_kwargs, kwargs["labels"], divisor=kwargs.get("num_items_in_batch"))
    return hf_compat.causal_lm_output(loss, out)
