"""Distillation from the dense teacher: logit KL, SquareHead feature loss and the frozen Teacher."""

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import TINY_CONFIGS, VOCAB, tiny_inputs, tiny_model

from pilot_hf import wrap_model
from pilot_hf.distillation import (
    Teacher,
    distillation_loss,
    feature_distillation_loss,
    lm_loss_value,
    logit_and_lm_loss,
    logit_distillation_loss,
)


def random_logits(batch=3, length=7, vocab=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g) * scale
    teacher = torch.randn(batch, length, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, 2] = labels[1, 0] = labels[1, 5] = labels[2, 6] = -100  # some ignored, one at position 0 (never used)
    labels[2, 1:4] = -100
    return student, teacher, labels


def reference_kl(student, teacher, labels, temperature):
    """Per token: T² · KL(p_t ‖ p_s) with F.kl_div, averaged over positions whose shifted label is not -100."""
    terms = []
    for b in range(student.shape[0]):
        for i in range(student.shape[1] - 1):
            if labels is not None and labels[b, i + 1] == -100:
                continue
            log_ps = F.log_softmax(student[b, i] / temperature, dim=-1)
            log_pt = F.log_softmax(teacher[b, i] / temperature, dim=-1)
            terms.append(temperature ** 2 * F.kl_div(log_ps, log_pt, log_target=True, reduction="sum"))
    return torch.stack(terms).mean()


# ----- logit distillation ---------------------------------------------------------------------------------


def test_logit_loss_is_zero_for_identical_logits():
    student, _, labels = random_logits()
    loss = logit_distillation_loss(student, student.clone(), labels, temperature=2.0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_loss_matches_per_token_kl_div(temperature):
    student, teacher, labels = random_logits()
    expected = reference_kl(student, teacher, labels, temperature)
    loss = logit_distillation_loss(student, teacher, labels, temperature=temperature)
    assert float(expected) > 0.1
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert int((labels[:, 1:] != -100).sum()) == 12  # of the 3 × 6 shifted positions (labels[1, 0] never counts)


def test_temperature_squared_factor():
    student, teacher, labels = random_logits()
    t2 = logit_distillation_loss(student, teacher, labels, temperature=2.0)
    # T² · KL at T=2 equals 4 × the (plain) KL of the logits divided by 2.
    plain = logit_distillation_loss(student / 2, teacher / 2, labels, temperature=1.0)
    torch.testing.assert_close(t2, 4 * plain, rtol=1e-5, atol=1e-6)


def test_logit_loss_without_labels_counts_all_but_last_position():
    student, teacher, _ = random_logits()
    loss = logit_distillation_loss(student, teacher, None, temperature=1.5)
    torch.testing.assert_close(loss, reference_kl(student, teacher, None, 1.5), rtol=1e-5, atol=1e-6)
    # The last position predicts nothing: changing it does not change the loss.
    student[:, -1] += 10 * torch.randn_like(student[:, -1])
    torch.testing.assert_close(logit_distillation_loss(student, teacher, None, temperature=1.5), loss)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000, "auto"])
def test_chunked_equals_unchunked(chunk_size):
    student, teacher, labels = random_logits(batch=4, length=9, vocab=50, seed=3)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    full = logit_distillation_loss(s1, teacher, labels, temperature=2.0, chunk_size=None)
    chunked = logit_distillation_loss(s2, teacher, labels, temperature=2.0, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-7)
    full.backward()
    chunked.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [None, 5, "auto"])
def test_lm_loss_value_is_the_shifted_cross_entropy(chunk_size):
    logits, _, labels = random_logits(batch=3, length=7, vocab=40, seed=5)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert (labels[:, 1:] == -100).any()  # the ignored positions are exercised
    torch.testing.assert_close(lm_loss_value(logits, labels, chunk_size=chunk_size), expected)


def test_auto_chunks_fit_the_byte_budget_and_skip_unlabelled_rows(monkeypatch):
    import pilot_hf.distillation as D

    student, teacher, labels = random_logits(batch=4, length=9, vocab=50, seed=4)
    labels[1] = -100  # a whole sequence without labels: its chunks are skipped, its gradient stays 0
    seen = []
    real = D._labelled_chunks
    monkeypatch.setattr(D, "_labelled_chunks", lambda w, n: (seen.append(n), real(w, n))[1])
    monkeypatch.setattr(D, "CHUNK_BYTES", 4 * 50 * 2)  # two rows of 50 float32 logits
    s = student.clone().requires_grad_(True)
    loss = logit_distillation_loss(s, teacher, labels)
    loss.backward()
    assert seen == [2]  # once (forward computes the gradient too), two positions per chunk
    assert not s.grad[1].any() and s.grad[0].any()
    # 36 positions in chunks of 2 rows; rows 8-20 hold no label (the last position of sequence 0, all of
    # sequence 1, the first three of sequence 2), so the six chunks starting at 8 ... 18 are skipped
    kept = [start for start, _, _ in real(D.label_weights(student, labels), 2)]
    assert kept == [0, 2, 4, 6, 20, 22, 24, 26, 28, 30, 32, 34]
    torch.testing.assert_close(loss, reference_kl(student, teacher, labels, 1.0), rtol=1e-5, atol=1e-6)


def test_logit_loss_backward_twice_is_refused_and_no_grad_keeps_nothing():
    student, teacher, labels = random_logits()
    s = student.clone().requires_grad_(True)
    loss = logit_distillation_loss(s, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()
    with torch.no_grad():  # no gradient wanted: the loss alone, the same value
        torch.testing.assert_close(logit_distillation_loss(s, teacher, labels), loss.detach())


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, "big"])
def test_bad_chunk_size_is_refused(chunk_size):
    student, teacher, labels = random_logits()
    with pytest.raises(ValueError, match="chunk_size must be"):
        logit_distillation_loss(student, teacher, labels, chunk_size=chunk_size)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_flows_to_student_logits_only(temperature):
    student, teacher, labels = random_logits(seed=5)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)  # even a teacher tensor that asks for a gradient gets none
    loss = logit_distillation_loss(s, t, labels, temperature=temperature, chunk_size=4)
    loss.backward()
    assert t.grad is None
    # Same gradient as autograd through the plain per-token formula.
    s_ref = student.clone().requires_grad_(True)
    reference_kl(s_ref, teacher, labels, temperature).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-7)
    # Positions that predict no label (and the last position) get exactly zero gradient.
    unused = torch.ones_like(labels, dtype=torch.bool)
    unused[:, :-1] = labels[:, 1:] == -100
    assert s.grad[unused].abs().max() == 0
    assert s.grad[~unused].abs().max() > 0


def test_num_items_replaces_the_local_count():
    student, teacher, labels = random_logits()
    mean = logit_distillation_loss(student, teacher, labels)
    kept = int((labels[:, 1:] != -100).sum())
    scaled = logit_distillation_loss(student, teacher, labels, num_items=torch.tensor(4 * kept))
    torch.testing.assert_close(scaled, mean / 4)


def test_no_labelled_position_gives_zero_and_a_zero_gradient():
    student, teacher, labels = random_logits()
    s = student.clone().requires_grad_(True)
    loss = logit_distillation_loss(s, teacher, torch.full_like(labels, -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad.abs().max() == 0


def test_bf16_logits_give_float32_loss_and_bf16_gradient():
    student, teacher, labels = random_logits(vocab=64)
    s = student.to(torch.bfloat16).requires_grad_(True)
    loss = logit_distillation_loss(s, teacher.to(torch.bfloat16), labels, temperature=2.0)
    assert loss.dtype == torch.float32
    expected = reference_kl(s.detach().float(), teacher.to(torch.bfloat16).float(), labels, 2.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16


def test_logit_loss_refuses_mismatched_shapes():
    student, teacher, labels = random_logits()
    with pytest.raises(ValueError, match="differ in shape"):
        logit_distillation_loss(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="temperature"):
        logit_distillation_loss(student, teacher, labels, temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_logit_and_lm_loss_in_one_pass_equals_the_two_losses_apart(temperature, chunk_size):
    """w_kd · T²·KL (over its count) + w_lm · Transformers' causal-LM cross-entropy (over another count): the same
    value and gradient as computing the two apart with autograd; the logged terms are the unweighted means."""
    student, teacher, labels = random_logits(length=9)
    labels[2, :] = -100  # a row without labels: with chunk_size 2 whole chunks are skipped
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    lm_items = torch.tensor(40)
    lm = T.loss.loss_utils.ForCausalLMLoss(s1, labels, s1.shape[-1], num_items_in_batch=lm_items)
    expected = 0.7 * reference_kl(s1, teacher, labels, temperature) + 1.5 * lm
    expected.backward()
    terms = logit_and_lm_loss(s2, teacher, labels, temperature, logit_weight=0.7, lm_weight=1.5,
                              lm_num_items=lm_items, chunk_size=chunk_size)
    torch.testing.assert_close(terms["loss"], expected.detach())
    terms["loss"].backward()
    torch.testing.assert_close(s2.grad, s1.grad)
    torch.testing.assert_close(terms["logit_loss"], reference_kl(student, teacher, labels, temperature))
    torch.testing.assert_close(terms["lm_loss"], T.loss.loss_utils.ForCausalLMLoss(student, labels, student.shape[-1]))
    assert not terms["logit_loss"].requires_grad and not terms["lm_loss"].requires_grad

    # lm_weight 0: the LM loss is still reported, and the gradient is the KL's alone.
    s3 = student.clone().requires_grad_(True)
    kl_only = logit_and_lm_loss(s3, teacher, labels, temperature, chunk_size=chunk_size)
    torch.testing.assert_close(kl_only["lm_loss"], terms["lm_loss"])
    kl_only["loss"].backward()
    s4 = student.clone().requires_grad_(True)
    logit_distillation_loss(s4, teacher, labels, temperature, chunk_size=chunk_size).backward()
    torch.testing.assert_close(s3.grad, s4.grad)


def test_lm_weight_needs_labels_and_a_logit_term():
    student, teacher, labels = random_logits()
    with pytest.raises(ValueError, match="needs labels"):
        logit_and_lm_loss(student, teacher, None, lm_weight=1.0)
    with pytest.raises(ValueError, match="needs logit_weight > 0"):
        distillation_loss({"logits": student, "hidden_states": (student, student)}, teacher, (teacher, teacher),
                          labels, logit_weight=0.0, feature_weight=1.0, lm_weight=1.0)


# ----- feature distillation -------------------------------------------------------------------------------


def random_hidden(layers=3, batch=2, length=5, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Layer l has scale 2^l, like residual streams that grow with depth; entry 0 is the embedding output.
    student = tuple(torch.randn(batch, length, hidden, generator=g) * 2 ** l for l in range(layers + 1))
    teacher = tuple(torch.randn(batch, length, hidden, generator=g) * 2 ** l for l in range(layers + 1))
    return student, teacher


def test_feature_loss_is_zero_for_identical_states():
    student, _ = random_hidden()
    loss = feature_distillation_loss(student, tuple(h.clone() for h in student))
    assert loss.dtype == torch.float32 and float(loss) == 0.0


def test_feature_loss_equals_hand_computation():
    student, teacher = random_hidden()
    per_layer = []
    for h_s, h_t in zip(student[1:], teacher[1:]):
        mse = ((h_s - h_t) ** 2).sum() / h_s.numel()
        norm = (h_t ** 2).sum() / h_t.numel()
        per_layer.append(mse / (norm + 1e-8))
    expected = sum(per_layer) / len(per_layer)
    torch.testing.assert_close(feature_distillation_loss(student, teacher), expected, rtol=1e-5, atol=1e-7)
    # Entry 0 (embedding output) is not compared.
    changed = (student[0] + 100,) + student[1:]
    torch.testing.assert_close(feature_distillation_loss(changed, teacher), expected, rtol=1e-5, atol=1e-7)


def test_feature_loss_is_invariant_to_a_common_scale():
    student, teacher = random_hidden()
    loss = feature_distillation_loss(student, teacher)
    for scale in (1e-2, 7.0, 300.0):
        scaled = feature_distillation_loss(tuple(h * scale for h in student), tuple(h * scale for h in teacher))
        torch.testing.assert_close(scaled, loss, rtol=1e-4, atol=1e-6)


def test_feature_loss_token_mask_selects_positions():
    student, teacher = random_hidden()
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    masked = feature_distillation_loss(student, teacher, mask)
    selected = feature_distillation_loss(tuple(h[mask][None] for h in student), tuple(h[mask][None] for h in teacher))
    torch.testing.assert_close(masked, selected)
    # Unselected positions do not matter.
    noisy = tuple(torch.where(mask[..., None], h, h + 50) for h in student)
    torch.testing.assert_close(feature_distillation_loss(noisy, teacher, mask), masked)
    empty = feature_distillation_loss(student, teacher, torch.zeros_like(mask))
    assert float(empty) == 0.0


def test_feature_loss_gradient_reaches_the_student_only():
    student, teacher = random_hidden()
    s = tuple(h.clone().requires_grad_(True) for h in student)
    t = tuple(h.clone().requires_grad_(True) for h in teacher)
    feature_distillation_loss(s, t).backward()
    assert all(h.grad is None for h in t)
    assert s[0].grad is None and all(h.grad.abs().max() > 0 for h in s[1:])


def test_feature_loss_refuses_a_different_depth():
    student, teacher = random_hidden()
    with pytest.raises(ValueError, match="decoder layers"):
        feature_distillation_loss(student, teacher[:-1])


# ----- the teacher ----------------------------------------------------------------------------------------


def test_teacher_from_model_matches_and_is_independent(arch):
    model = tiny_model(arch)
    ids = tiny_inputs()
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True)
    teacher = Teacher.from_model(model)
    logits, hidden = teacher(ids, need_hidden=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference.logits)
    assert len(hidden) == model.config.num_hidden_layers + 1
    for h, ref in zip(hidden, reference.hidden_states):
        torch.testing.assert_close(h, ref)
    assert teacher(ids)[1] is None

    # Frozen, eval mode, and nothing shared with the student.
    assert all(not p.requires_grad for p in teacher.model.parameters())
    model.train()
    assert not teacher.model.training
    student_params = {id(p) for p in model.parameters()}
    student_storage = {t.data_ptr() for t in model.state_dict().values()}
    for p in teacher.model.parameters():
        assert id(p) not in student_params
        assert p.data_ptr() not in student_storage
    assert not any(n.startswith("teacher") for n in model.state_dict())

    # Training the student leaves the teacher unchanged.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.testing.assert_close(teacher(ids)[0], logits)


def test_teacher_bf16_returns_float32():
    model = tiny_model("llama")
    ids = tiny_inputs()
    teacher = Teacher.from_model(model, dtype="bfloat16")
    assert teacher.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the student keeps its dtype
    logits, hidden = teacher(ids, need_hidden=True)
    assert logits.dtype == torch.float32 and all(h.dtype == torch.float32 for h in hidden)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()
    with pytest.raises(ValueError, match="dtype"):
        Teacher.from_model(model, dtype="int8")


def test_teacher_under_autocast():
    model = tiny_model("qwen2")
    ids = tiny_inputs()
    teacher = Teacher.from_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, hidden = teacher(ids, attention_mask=torch.ones_like(ids), need_hidden=True)
    assert logits.dtype == torch.float32 and all(h.dtype == torch.float32 for h in hidden)
    assert not logits.requires_grad
    torch.testing.assert_close(logits, teacher(ids)[0], rtol=0.1, atol=0.1)


def test_teacher_turns_activation_checkpointing_off_on_its_copy_only():
    model = tiny_model("llama")
    model.activation_checkpointing_enable()
    teacher = Teacher.from_model(model)
    assert model.is_activation_checkpointing and not teacher.model.is_activation_checkpointing


def test_teacher_refuses_a_wrapped_model():
    model = tiny_model("llama")
    wrap_model(model)
    with pytest.raises(ValueError, match="MaskedLinear"):
        Teacher.from_model(model)


def other_model(**changes):
    config = TINY_CONFIGS["llama"]()
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


def test_check_compatible():
    teacher = Teacher.from_model(tiny_model("llama"))
    student = tiny_model("llama", seed=1)
    teacher.check_compatible(student, need_hidden=True)
    wrap_model(student)  # a wrapped student still fits
    teacher.check_compatible(student, need_hidden=True)

    with pytest.raises(ValueError, match=f"vocabulary size: student {VOCAB + 8}, teacher {VOCAB}"):
        teacher.check_compatible(other_model(vocab_size=VOCAB + 8), need_hidden=False)

    deeper = other_model(num_hidden_layers=3)
    teacher.check_compatible(deeper, need_hidden=False)  # logits only: depth does not matter
    with pytest.raises(ValueError, match="decoder layers: student 3, teacher 2.*feature distillation off"):
        teacher.check_compatible(deeper, need_hidden=True)

    wider = other_model(hidden_size=64, head_dim=8)
    with pytest.raises(ValueError, match="hidden size: student 64, teacher 32"):
        teacher.check_compatible(wider, need_hidden=True)


def test_teacher_from_pretrained(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    ids = tiny_inputs()
    teacher = Teacher.from_pretrained(str(tmp_path / "tiny"))
    assert teacher.dtype == torch.float32 and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids)[0], model(input_ids=ids).logits)
    assert Teacher.from_pretrained(str(tmp_path / "tiny"), dtype="bfloat16").dtype == torch.bfloat16

    with pytest.raises(ValueError, match="cannot load the teacher"):
        Teacher.from_pretrained(str(tmp_path / "missing"))


# ----- the combination, end to end ------------------------------------------------------------------------


def test_distillation_loss_end_to_end():
    model = tiny_model("llama")
    teacher = Teacher.from_model(model)
    wrap_model(model)  # the student: same function as the teacher at the start
    ids = tiny_inputs()
    labels = ids.clone()
    labels[:, :3] = -100
    attention = torch.ones_like(ids)

    model.train()
    outputs = model(input_ids=ids, attention_mask=attention, labels=labels, output_hidden_states=True)
    t_logits, t_hidden = teacher(ids, attention, need_hidden=True)
    terms = distillation_loss(outputs, t_logits, t_hidden, labels, logit_weight=1.0, feature_weight=0.5,
                              temperature=2.0, token_mask=attention.bool())
    assert set(terms) == {"logit_loss", "feature_loss", "lm_loss", "loss"}
    torch.testing.assert_close(terms["lm_loss"], outputs.loss.detach())  # the model's own LM loss, for the logs
    assert float(terms["logit_loss"].detach()) < 1e-6 and float(terms["feature_loss"].detach()) < 1e-6
    torch.testing.assert_close(terms["loss"], terms["logit_loss"] + 0.5 * terms["feature_loss"])

    # After a change of the student, the terms are positive and their gradients reach its parameters only.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    model.zero_grad()
    outputs = model(input_ids=ids, attention_mask=attention, labels=labels, output_hidden_states=True)
    terms = distillation_loss(outputs, t_logits, t_hidden, labels, logit_weight=1.0, feature_weight=0.5,
                              temperature=2.0, token_mask=attention.bool())
    assert float(terms["logit_loss"].detach()) > 1e-4 and float(terms["feature_loss"].detach()) > 1e-4
    (outputs.loss + terms["loss"]).backward()
    masks = [p for n, p in model.named_parameters() if n.endswith(".mask")]
    assert masks and all(p.grad is not None and p.grad.abs().max() > 0 for p in masks)
    assert all(p.grad is None for p in teacher.model.parameters())

    only_logits = distillation_loss(outputs, t_logits, None, labels, logit_weight=1.0, feature_weight=0.0,
                                    temperature=2.0)
    assert set(only_logits) == {"logit_loss", "lm_loss", "loss"}
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        distillation_loss({"logits": outputs.logits}, t_logits, t_hidden, labels, logit_weight=1.0,
                          feature_weight=1.0, temperature=1.0)
